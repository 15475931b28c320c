"""Command line that needs no running Airflow.

    python -m include validate FILE [--inventory PATH ...]
    python -m include plan FILE [--inventory PATH ...] [--json]
    python -m include status NAMESPACE/NAME [--store DIR]

``FILE`` holds one or more YAML documents (VMMigration, and optionally the VirtualMachine, Provider
and Secret objects it points at, like ``kubectl apply -f``). ``--inventory`` adds more such files
or folders (the spec store's folder, for instance).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

from include.inventory import BundleInventory, resolve
from include.plan import build_plan, describe
from include.providers import driver_for
from include.spec import SpecValidationError
from include.storage import backend_for
from include.store import FileStatusSink, SpecFileError, SpecStore, index_documents, load_documents


def _documents(paths: list[Path]) -> list[tuple[Path, list[dict]]]:
    """Every file's documents; a file that cannot be read safely stops the command, naming the file."""
    out = []
    for path in paths:
        try:
            files = sorted(p for p in path.iterdir() if p.suffix in (".yaml", ".yml")) if path.is_dir() else [path]
        except OSError as err:
            raise _InputError(f"{path}: not readable: {err.strerror or err}") from None
        for file in files:
            try:
                out.append((file, load_documents(file)))
            except SpecFileError as err:
                raise _InputError(f"{file}: {err}") from None
            except OSError as err:
                raise _InputError(f"{file}: not readable: {err.strerror or err}") from None
    return out


class _InputError(Exception):
    """Bad input for a command: printed as ``error: ...`` (exit 2), never as a traceback."""


def _load(args: argparse.Namespace):
    docs = _documents([Path(args.file)] + [Path(p) for p in args.inventory])
    index = index_documents(docs)
    mine = {e.key: e for e in index.migrations.values() if e.path == Path(args.file)}
    # what the store would report about this file: a document with a bad metadata.name, a duplicate
    problems = [p for p in index.problems if p.startswith(f"{Path(args.file)}: ")]
    if not mine and not problems:
        raise _InputError(f"{args.file} holds no VMMigration document")
    return index, mine, problems


def cmd_validate(args: argparse.Namespace) -> int:
    index, mine, problems = _load(args)
    inventory = BundleInventory(index.objects)
    failed = 0
    for problem in problems:
        failed += 1
        print(f"error: {problem}")
    for key, entry in mine.items():
        errors = [str(e) for e in entry.error.errors] if entry.error else []
        if entry.migration is not None and (args.inventory or len(index.objects)):
            try:
                resolve(entry.migration, inventory)
            except SpecValidationError as err:
                errors += [str(e) for e in err.errors]
            except Exception as err:  # noqa: BLE001 - a malformed inventory object is bad input too
                errors.append(f"inventory: cannot be followed ({type(err).__name__}: {err})")
        if errors:
            failed += 1
            print(f"VMMigration {key}: {len(errors)} error{'s' if len(errors) != 1 else ''}")
            for err in errors:
                print(f"  {err}")
        else:
            print(f"VMMigration {key}: valid")
    return 1 if failed else 0


def cmd_plan(args: argparse.Namespace) -> int:
    index, mine, problems = _load(args)
    inventory = BundleInventory(index.objects)
    status = 1 if problems else 0
    for problem in problems:
        print(f"error: {problem}", file=sys.stderr)
    plans = []
    for key, entry in mine.items():
        try:
            if entry.error:
                raise entry.error
            assert entry.migration is not None
            resolved = resolve(entry.migration, inventory)
            source = driver_for(resolved.source.provider)
            try:
                vm = source.get_vm(resolved.source.provider_vm_id)
            finally:
                source.close()
            pool = entry.migration.spec.targetStorageHint or driver_for(resolved.target).default_storage()
            plan = build_plan(resolved, vm, target_storage=pool)
            storage = backend_for(entry.migration.spec.storage, resolved.storage_credentials)
            location = storage.location(plan.storage.prefix)
        except SpecValidationError as err:
            print(f"VMMigration {key}: cannot plan:", file=sys.stderr)
            for e in err.errors:
                print(f"  {e}", file=sys.stderr)
            status = 1
            continue
        except Exception as err:  # noqa: BLE001 - report and go on with the next document
            print(f"VMMigration {key}: cannot plan: {err}", file=sys.stderr)
            status = 1
            continue
        shown = plan.to_dict()
        shown["storage"]["location"] = location
        plans.append(shown)
        if not args.json:
            print(describe(plan, location))
    if args.json:
        print(json.dumps(plans if len(plans) != 1 else plans[0], indent=2))
    return status


def cmd_status(args: argparse.Namespace) -> int:
    store = SpecStore(args.store) if args.store else SpecStore()
    namespace, _, name = args.name.rpartition("/")
    try:
        store.status_path(namespace or "default", name)
    except ValueError as err:
        raise _InputError(f"{args.name}: not NAMESPACE/NAME: {err}") from None
    try:
        status = FileStatusSink(store).get(namespace or "default", name)
    except (OSError, ValueError) as err:
        raise _InputError(f"the status of {namespace or 'default'}/{name} is not readable: {err}") from None
    if status is None:
        print(f"no status for {namespace or 'default'}/{name} in {store.root}", file=sys.stderr)
        return 1
    print(yaml.safe_dump({"status": status}, sort_keys=False))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m include", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, func, help_text in (("validate", cmd_validate, "check a VMMigration file, every error with its path"),
                                  ("plan", cmd_plan, "show what a run would do")):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("file")
        p.add_argument("--inventory", action="append", default=[],
                       help="YAML file or folder with VirtualMachine/Provider/Secret objects (repeatable)")
        p.set_defaults(func=func)
        if name == "plan":
            p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p = sub.add_parser("status", help="print a migration's status from the spec store")
    p.add_argument("name", help="NAMESPACE/NAME")
    p.add_argument("--store", help="spec store folder (default: $VMMIGRATION_STORE or var/store)")
    p.set_defaults(func=cmd_status)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except _InputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
