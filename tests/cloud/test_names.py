"""Names are fullmatched everywhere in the cloud: "$" also matches before a trailing newline."""

from __future__ import annotations

import pytest

from lepton_edge.cloud.artifacts import MemoryArtifactStore
from lepton_edge.cloud.errors import InvalidRequestError, NotFoundError, StoreError


@pytest.mark.parametrize("key", ["abc.lepton\n", "abc\n.lepton", "../x", "ABC"])
def test_artifact_keys_are_fullmatched(key, tmp_path):
    src = tmp_path / "f"
    src.write_bytes(b"x")
    with pytest.raises(StoreError):
        MemoryArtifactStore().put(key, src)


def test_deployment_id_prefixes_are_fullmatched():
    from lepton_edge.cloud.rollout import Rollouts

    r = Rollouts.__new__(Rollouts)  # resolve() refuses before it touches the database
    for bad in ("abc\n", "abc\ndef", "ABC", ""):
        with pytest.raises(NotFoundError):
            r.resolve(bad)


@pytest.mark.parametrize("device_id", ["dev-1\n", "dev\n1", "lepton-cloud", "lepton-cloud-1-abc", " dev"])
def test_enrolment_refuses_ids_that_would_break_the_broker_files(device_id, tmp_path):
    from lepton_edge.cloud import db
    from lepton_edge.cloud.fleet import Fleet

    fleet = Fleet(db.connect(tmp_path / "c.db"), auth_dir=tmp_path / "auth")
    with pytest.raises(InvalidRequestError):
        fleet.enroll(device_id, "rpi5")
    assert not (tmp_path / "auth" / "passwd").exists()
