"""include/errors.py: the domain errors, whether retrying helps, and their condition reasons."""

from __future__ import annotations

import pickle

import pytest

from include import errors as e

ALL = [e.MigrationFailure, e.InvalidMigration, e.NotFound, e.Conflict, e.UnsupportedDiskFormat, e.HypervisorError,
       e.StorageError, e.StorageAuthError, e.ChecksumError, e.ConversionError, e.TargetCreationError,
       e.TargetValidationError, e.ConfigurationError, e.PlanChanged, e.MigrationDeleted]


def test_every_error_is_a_migration_failure_with_a_reason():
    # one hierarchy: the operators and the notifier handle MigrationFailure only
    for cls in ALL:
        assert issubclass(cls, e.MigrationFailure) and cls.reason


def test_field_prefixes_the_message():
    err = e.NotFound("VirtualMachine kvm-vms/web not found", field="spec.sourceName")
    assert str(err) == "spec.sourceName: VirtualMachine kvm-vms/web not found"
    assert err.field == "spec.sourceName"
    assert str(e.StorageError("share gone")) == "share gone"
    assert e.StorageError("share gone").field is None


@pytest.mark.parametrize("cls", ALL)
def test_errors_pickle_with_their_message_and_class(cls):
    err = cls("something failed", field="spec.storage.path")
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is cls
    assert str(back) == "spec.storage.path: something failed"
    assert back.permanent is cls.permanent


def test_pickle_keeps_the_field():
    back = pickle.loads(pickle.dumps(e.InvalidMigration("too small", field="spec.targetResourceHints.disk")))
    assert back.field == "spec.targetResourceHints.disk"
