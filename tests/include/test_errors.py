"""include/errors.py: the domain errors, whether retrying helps, and their condition reasons."""

from __future__ import annotations

import pickle

import pytest

from include import errors as e

ALL = [e.MigrationFailure, e.InvalidMigration, e.NotFound, e.Conflict, e.UnsupportedDiskFormat, e.HypervisorError,
       e.StorageError, e.StorageAuthError, e.ChecksumError, e.ConversionError, e.TargetCreationError,
       e.TargetValidationError]


@pytest.mark.parametrize(("cls", "permanent", "reason"), [
    (e.InvalidMigration, True, "ValidationFailed"),
    (e.NotFound, True, "NotFound"),
    (e.Conflict, True, "Conflict"),
    (e.UnsupportedDiskFormat, True, "UnsupportedDiskFormat"),
    (e.HypervisorError, False, "HypervisorError"),
    (e.StorageError, False, "StorageError"),
    (e.StorageAuthError, True, "StorageAuthenticationFailed"),
    (e.ChecksumError, False, "ChecksumMismatch"),
    (e.ConversionError, False, "ConversionFailed"),
    (e.TargetCreationError, False, "CreateFailed"),
    (e.TargetValidationError, True, "TargetValidationFailed"),
])
def test_permanence_and_reasons(cls, permanent, reason):
    err = cls("boom")
    assert err.permanent is permanent
    assert err.reason == reason
    assert isinstance(err, e.MigrationFailure)


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
