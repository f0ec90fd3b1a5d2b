"""Detectors: each built-in on a hand-made store, partition invariance, user
detectors (file, legacy functions), failures, idempotent merges, pickling, CLI."""

from __future__ import annotations

import copy
import pickle
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import pipeline
from pipeline import detectors as det
from pipeline.cli import main
from pipeline.detectors import (
    BUILTINS,
    BaseDetector,
    DetectorError,
    FrameGap,
    FunctionDetector,
    HighlyVariableMask,
    IncompleteExperiment,
    LowMaskConfidence,
    LowPhenotypeConfidence,
    MissingGenotype,
    NoEmbryo,
    ShortTrack,
    load_detectors_file,
    make_detector,
    parse_detector_spec,
    run_detectors,
    run_detectors_partition,
)
from pipeline.errors import MergeConflictError
from pipeline.schema import FLAG_CHANGE_COLUMNS
from pipeline.snips import snips_from_store
from pipeline.store import Store, read_store
from pipeline.testing import make_store

USER_FILE = Path(__file__).parent / "data" / "detectors_user.py"
STAMP = "2026-01-05T10:00:00+00:00"
KEY = ["detector", "entity_id", "flag"]


# ------------------------------------------------------------ hand-made store
def _snip(frame, area=1.0e5, mask=0.9, pheno_conf=None, flagged=False):
    phenotype = {"value": "NORMAL", "author": "alee", "timestamp": STAMP}
    if pheno_conf is not None:
        phenotype["confidence"] = pheno_conf
    flags = (
        [
            {
                "value": "MOTION_BLUR",
                "author": "alee",
                "timestamp": STAMP,
                "severity": "warning",
            }
        ]
        if flagged
        else []
    )
    return {
        "frame": frame,
        "phenotype": phenotype,
        "flags": flags,
        "measurements": {
            "area_um2": area,
            "length_um": 1000.0,
            "mask_confidence": mask,
        },
    }


def _embryo(exp, video, snips, genotype="WT"):
    geno = (
        None
        if genotype is None
        else {
            "value": genotype,
            "author": "bkim",
            "timestamp": STAMP,
            "confirmed": True,
        }
    )
    eid = f"{video}_e01"
    return eid, {
        "source": {"experiment_id": exp, "video_id": video},
        "genotype": geno,
        "treatments": [],
        "death_frame": None,
        "flags": [],
        "snips": {f"{eid}_s{s['frame']:04d}": s for s in snips},
    }


def hand_made_document():
    """Two experiments; every built-in has known hits (see EXPECTED)."""
    exp1, exp2 = "20240301", "20240302_batch1"
    embryos = dict(
        [
            # A01: area jumps at frame 5, mask confidence low at frame 3.
            _embryo(
                exp1,
                f"{exp1}_A01",
                [
                    _snip(
                        f, area=2.0e5 if f == 5 else 1.0e5, mask=0.2 if f == 3 else 0.9
                    )
                    for f in range(12)
                ],
            ),
            # A02: frames 3 and 4 missing, no genotype, an unsure phenotype at frame 1.
            _embryo(
                exp1,
                f"{exp1}_A02",
                [
                    _snip(f, pheno_conf=0.3 if f == 1 else 0.95)
                    for f in (0, 1, 2, *range(5, 13))
                ],
                genotype=None,
            ),
            # A03: a short track whose snips are all flagged.
            _embryo(exp1, f"{exp1}_A03", [_snip(f, flagged=True) for f in range(4)]),
            # A04: an embryo without snips.
            _embryo(exp1, f"{exp1}_A04", []),
            _embryo(exp2, f"{exp2}_A01", [_snip(f) for f in range(12)]),
        ]
    )
    return {
        "file_info": {
            "schema_version": 1,
            "created": STAMP,
            "last_updated": STAMP,
            "source": "tests",
        },
        "embryos": embryos,
        # B01 is listed (a video flag) but has no embryo at all.
        "flags": {
            "experiment": {},
            "video": {
                f"{exp1}_B01": [
                    {
                        "value": "FOCUS_DRIFT",
                        "author": "alee",
                        "timestamp": STAMP,
                        "severity": "info",
                    }
                ]
            },
            "image": {},
        },
    }


EXPECTED = {
    HighlyVariableMask(): {("20240301_A01_e01_s0005", "HIGHLY_VAR_MASK")},
    LowMaskConfidence(): {("20240301_A01_e01_s0003", "LOW_CONFIDENCE")},
    LowPhenotypeConfidence(): {("20240301_A02_e01_s0001", "LOW_CONFIDENCE")},
    FrameGap(): {("20240301_A02_e01_s0005", "FRAME_GAP")},
    ShortTrack(): {("20240301_A03_e01", "SHORT_TRACK")},
    MissingGenotype(): {("20240301_A02_e01", "MISSING_GENOTYPE")},
    NoEmbryo(): {
        ("20240301_A03", "NO_EMBRYO"),
        ("20240301_A04", "NO_EMBRYO"),
        ("20240301_B01", "NO_EMBRYO"),
    },
    IncompleteExperiment(plate_wells=3): {("20240302_batch1", "INCOMPLETE")},
}


@pytest.fixture
def hand_store():
    return Store(hand_made_document())


def _hits(changes):
    raised = changes.loc[changes["status"] == "raised"]
    return set(zip(raised["entity_id"], raised["flag"], strict=True))


@pytest.mark.parametrize("detector", list(EXPECTED), ids=lambda d: d.name)
@pytest.mark.parametrize(
    "npartitions", [1, 2, 4], ids=["one-part", "two-parts", "four-parts"]
)
def test_builtin_on_hand_made_store(hand_store, detector, npartitions):
    snips = snips_from_store(hand_store, npartitions=npartitions)
    changes = run_detectors(snips, [detector], store=hand_store).compute(
        scheduler="sync"
    )
    assert _hits(changes) == EXPECTED[detector]
    assert (changes["author"] == f"auto:{detector.name}").all()
    assert (changes["level"] == detector.level).all()
    assert changes["notes"].notna().all()


def test_notes_give_the_figure_against_the_threshold(hand_store):
    table = hand_store.snip_table()
    out = run_detectors_partition(
        table,
        [
            HighlyVariableMask(),
            ShortTrack(),
            IncompleteExperiment(plate_wells=3, max_short_fraction=0.3),
        ],
    )
    notes = dict(zip(out["entity_id"], out["notes"], strict=True))
    assert (
        notes["20240301_A01_e01_s0005"]
        == "area_um2 200000.0 vs rolling median 100000.0: relative change 1.00 > 0.3"
    )
    assert notes["20240301_A03_e01"] == "4 snips < 10"
    assert notes["20240301"] == "0.33 of tracks short (< 10 snips) > 0.3"
    assert notes["20240302_batch1"] == "1 videos < 3 wells"


def test_parameters_change_the_hits(hand_store):
    table = hand_store.snip_table()
    assert _hits(run_detectors_partition(table, [ShortTrack(min_snips=12)])) == {
        ("20240301_A03_e01", "SHORT_TRACK"),
        ("20240301_A02_e01", "SHORT_TRACK"),
    }
    assert _hits(run_detectors_partition(table, [FrameGap(min_missing=3)])) == set()
    no_store = run_detectors_partition(
        table, [NoEmbryo()]
    )  # without the store: only all-flagged videos
    assert _hits(no_store) == {("20240301_A03", "NO_EMBRYO")}


def test_change_set_schema_is_exact(hand_store):
    changes = run_detectors(
        snips_from_store(hand_store, npartitions=2), list(EXPECTED), store=hand_store
    )
    assert (
        changes._meta.dtypes.to_dict()
        == pipeline.schema.empty_frame(FLAG_CHANGE_COLUMNS).dtypes.to_dict()
    )
    out = changes.compute(scheduler="sync")
    assert list(out.columns) == list(FLAG_CHANGE_COLUMNS)
    assert {str(t) for t in out.dtypes} == {
        str(t) for t in FLAG_CHANGE_COLUMNS.values()
    }
    assert set(out["status"]) == {"raised"}
    assert out["reason"].isna().all()


def _sorted(changes):
    return changes.sort_values(KEY).reset_index(drop=True)


@pytest.mark.parametrize(
    "npartitions", [1, 3, 7], ids=["one-part", "three-parts", "seven-parts"]
)
def test_partition_invariance_and_pandas_twin(npartitions):
    store = make_store(n_experiments=3, n_embryos=12, n_frames=14, seed=3)
    detectors = [cls() for cls in BUILTINS.values()]
    snips = snips_from_store(store, npartitions=npartitions)
    assert snips.npartitions == npartitions
    got = _sorted(
        run_detectors(snips, detectors, store=store).compute(scheduler="sync")
    )
    expected = _sorted(
        run_detectors_partition(store.snip_table(), detectors, store=store)
    )
    pd.testing.assert_frame_equal(got, expected)
    assert {"FrameGap", "ShortTrack", "MissingGenotype", "IncompleteExperiment"} <= set(
        got["detector"]
    )


def test_missing_column_names_detector_and_column(hand_store):
    snips = snips_from_store(hand_store, npartitions=2)
    with pytest.raises(
        DetectorError,
        match=r"HighlyVariableMask needs column\(s\) 'volume_um3'.*area_um2",
    ):
        run_detectors(snips, [HighlyVariableMask(column="volume_um3")])


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("ShortTrak", "unknown detector 'ShortTrak' (did you mean 'ShortTrack'?)"),
        (
            "ShortTrack:min_snip=5",
            "ShortTrack: unknown parameter(s) min_snip; parameters: min_snips, severity",
        ),
        (
            "ShortTrack:min_snips=five",
            "ShortTrack: parameter min_snips='five' is not a finite int",
        ),
        ("ShortTrack:min_snips", "is not key=value"),
        ("ShortTrack:min_snips=0", "min_snips must be a positive number"),
        ("MissingGenotype:include_tbd=maybe", "is not true or false"),
        (
            "ShortTrack:severity=fatal",
            "severity 'fatal' is not one of info, warning, error",
        ),
    ],
)
def test_cli_parameter_errors(spec, message):
    with pytest.raises(DetectorError, match=re.escape(message)):
        make_detector(*parse_detector_spec(spec))


def test_cli_parameters_are_typed():
    assert make_detector(
        *parse_detector_spec("HighlyVariableMask:threshold=0.5,window=7")
    ) == HighlyVariableMask(threshold=0.5, window=7)
    assert (
        make_detector(
            *parse_detector_spec("MissingGenotype:include_tbd=yes")
        ).include_tbd
        is True
    )


def test_flag_not_permitted_at_level_is_refused():
    @dataclass(frozen=True)
    class Wrong(BaseDetector):
        level = "embryo"
        value = "FRAME_GAP"
        severity: str = "warning"

    with pytest.raises(
        DetectorError, match="flag 'FRAME_GAP' is not permitted at level 'embryo'"
    ):
        Wrong()


# ------------------------------------------------------------- user detectors
def test_user_detectors_file(hand_store):
    found = load_detectors_file(USER_FILE)
    assert list(found) == ["ShortBody", "DeadWell", "big_embryo"]  # _helper is private
    hand_store.doc["embryos"]["20240301_A01_e01"]["snips"]["20240301_A01_e01_s0000"][
        "measurements"
    ]["length_um"] = 500.0
    hand_store.invalidate()
    changes = run_detectors(
        snips_from_store(hand_store, npartitions=3),
        list(found.values()),
        store=hand_store,
    )
    out = changes.compute(scheduler="sync")
    assert _hits(out.loc[out["detector"] == "ShortBody"]) == {
        ("20240301_A01_e01_s0000", "OUT_OF_FOCUS")
    }
    assert _hits(out.loc[out["detector"] == "DeadWell"]) == set()
    legacy = out.loc[out["detector"] == "big_embryo"]
    assert _hits(legacy) == {("20240301_A01_e01_s0005", "MASK_ON_EDGE")}
    assert legacy["severity"].tolist() == ["info"]
    assert legacy["confidence"].tolist() == [0.7]
    assert (
        make_detector("ShortBody", {"min_length": "2000"}, found).min_length == 2000.0
    )
    assert make_detector("big_embryo", {"max_area": "1e9"}, found).params() == {
        "max_area": 1e9
    }


def big_area(entity_id, entity_data, limit=150_000.0):
    if entity_data["area_um2"] > limit:
        return {"value": "HIGHLY_VAR_MASK", "notes": f"{entity_data['area_um2']:.0f}"}
    return None


def few_snips(entity_id, entity_data, n=5):
    return {"notes": f"{len(entity_data)} snips"} if len(entity_data) < n else None


few_snips.level = "embryo"
few_snips.value = "SHORT_TRACK"


def test_legacy_function_detectors(hand_store):
    detectors = [FunctionDetector(big_area), FunctionDetector(few_snips)]
    out = run_detectors(snips_from_store(hand_store, npartitions=2), detectors).compute(
        scheduler="sync"
    )
    assert _hits(out) == {
        ("20240301_A01_e01_s0005", "HIGHLY_VAR_MASK"),
        ("20240301_A03_e01", "SHORT_TRACK"),
    }
    assert set(out["author"]) == {"auto:big_area", "auto:few_snips"}
    assert set(out["severity"]) == {"warning"}


def test_legacy_function_cannot_run_per_experiment():
    with pytest.raises(DetectorError, match="cannot run at level 'experiment'"):
        FunctionDetector(big_area, level="experiment")


# ------------------------------------------------------------------- failures
class Explodes:
    """Raises on partitions holding experiment 20240302_batch1."""

    name = "Explodes"
    level = "snip"
    value = "MOTION_BLUR"
    required_columns = ("experiment_id",)

    def params(self):
        return {}

    def __call__(self, part):
        if (part["experiment_id"] == "20240302_batch1").any():
            msg = "division by zero in the blur score"
            raise ZeroDivisionError(msg)
        return pd.DataFrame({"entity_id": part.index[:0]})


class BadHits(Explodes):
    name = "BadHits"

    def __call__(self, part):
        return pd.DataFrame({"entity_id": part.index[:1], "flag": ["NOT_A_FLAG"]})


def test_failing_detector_is_reported_and_others_still_merge(hand_store):
    snips = snips_from_store(hand_store, npartitions=3)
    changes = run_detectors(
        snips, [Explodes(), BadHits(), ShortTrack()], store=hand_store
    ).compute(scheduler="sync")
    failed = changes.loc[changes["status"] == "failed"]
    last = snips.get_partition(snips.npartitions - 1).compute()
    reason = (
        f"Explodes failed on partition {last.index[0]}..{last.index[-1]}: "
        "ZeroDivisionError: division by zero in the blur score"
    )
    assert reason in failed["reason"].tolist()
    assert failed["entity_id"].isna().all()
    assert any("BadHits failed" in r and "'NOT_A_FLAG'" in r for r in failed["reason"])
    assert _hits(changes) == {("20240301_A03_e01", "SHORT_TRACK")}

    before = copy.deepcopy(hand_store.doc)
    with pytest.raises(MergeConflictError, match="strict=True: nothing written"):
        pipeline.merge_into_store(hand_store, changes, strict=True)
    assert hand_store.doc == before
    report = pipeline.merge_into_store(hand_store, changes)
    assert report.exit_code == 1
    assert [f["value"] for f in hand_store.embryos["20240301_A03_e01"]["flags"]] == [
        "SHORT_TRACK"
    ]


class PartialExplodes(IncompleteExperiment):
    def partial(self, part):
        if (part["video_id"] == "20240301_A02").any():
            msg = "bad plate map"
            raise RuntimeError(msg)
        return super().partial(part)


def test_failing_reducing_detector_leaves_out_tainted_entities(hand_store):
    snips = snips_from_store(hand_store, npartitions=4)
    out = run_detectors(snips, [PartialExplodes(plate_wells=3)]).compute(
        scheduler="sync"
    )
    assert (
        out.loc[out["status"] == "failed", "reason"]
        .str.contains("PartialExplodes failed on partition 20240301_A02_e01_s0000..")
        .all()
    )
    assert _hits(out) == {
        ("20240302_batch1", "INCOMPLETE")
    }  # 20240301 was in the failed partition


# ------------------------------------------------------------------- merging
def _flags_by(store, author):
    return sorted(
        store.flags_table()
        .query("author == @author")[["entity_id", "flag"]]
        .itertuples(index=False, name=None)
    )


def test_rerun_updates_instead_of_duplicating(hand_store):
    detectors = [
        cls() for cls in BUILTINS.values() if cls is not IncompleteExperiment
    ] + [IncompleteExperiment(plate_wells=3)]
    for _ in range(2):
        snips = snips_from_store(hand_store, npartitions=2)
        pipeline.merge_into_store(
            hand_store, run_detectors(snips, detectors, store=hand_store)
        )
    table = hand_store.flags_table()
    assert not table.duplicated(["level", "entity_id", "flag"]).any()
    auto = table.loc[table["author"].str.startswith("auto:")]
    expected = set().union(*EXPECTED.values())
    assert set(zip(auto["entity_id"], auto["flag"], strict=True)) == expected
    assert auto["auto_generated"].all()
    assert hand_store.validate(raise_on_error=False) == []


def test_replace_clears_flags_no_longer_found(hand_store):
    hand_store.add_flag("20240301_A01_e01", "SHORT_TRACK", "embryo", author="alee")
    pipeline.merge_into_store(
        hand_store,
        run_detectors(snips_from_store(hand_store), [ShortTrack(min_snips=12)]),
    )
    assert _flags_by(hand_store, "auto:ShortTrack") == [
        ("20240301_A02_e01", "SHORT_TRACK"),
        ("20240301_A03_e01", "SHORT_TRACK"),
    ]
    # Without --replace a stricter re-run leaves the earlier flag in place...
    pipeline.merge_into_store(
        hand_store, run_detectors(snips_from_store(hand_store), [ShortTrack()])
    )
    assert len(_flags_by(hand_store, "auto:ShortTrack")) == 2
    # ... with it, the flag this detector no longer finds goes; a person's flag stays.
    pipeline.merge_into_store(
        hand_store,
        run_detectors(snips_from_store(hand_store), [ShortTrack()]),
        replace_authors=["auto:ShortTrack"],
    )
    assert _flags_by(hand_store, "auto:ShortTrack") == [
        ("20240301_A03_e01", "SHORT_TRACK")
    ]
    assert _flags_by(hand_store, "alee")[0] == ("20240301_A01_e01", "SHORT_TRACK")


# ------------------------------------------------------------------ pickling
@pytest.mark.parametrize("cls", list(BUILTINS.values()), ids=list(BUILTINS))
def test_builtins_pickle(cls):
    detector = cls()
    clone = pickle.loads(pickle.dumps(detector))
    assert clone == detector
    assert clone.name == cls.__name__
    assert clone.params() == detector.params()


def test_file_detectors_unpickle_where_the_file_is_not_importable():
    found = load_detectors_file(USER_FILE)
    payload = pickle.dumps(list(found.values()))
    code = (
        "import pickle, sys; from pipeline.testing import make_store\n"
        "dets = pickle.loads(sys.stdin.buffer.read())\n"
        "table = make_store(n_experiments=1, n_embryos=2, n_frames=3, seed=0).snip_table()\n"
        "print(sorted(d.name for d in dets), [len(d(table)) >= 0 for d in dets])\n"
    )
    # A fresh interpreter in another folder: the user's module cannot be imported there.
    out = subprocess.run(
        [sys.executable, "-c", code],
        input=payload,
        capture_output=True,
        check=True,
        cwd="/",
    )
    assert (
        out.stdout.decode().strip()
        == "['DeadWell', 'ShortBody', 'big_embryo'] [True, True, True]"
    )


@pytest.mark.distributed
def test_local_cluster_with_processes_matches_sync():
    distributed = pytest.importorskip("distributed")
    store = make_store(n_experiments=3, n_embryos=10, n_frames=12, seed=5)
    found = load_detectors_file(USER_FILE)
    found["big_embryo"] = make_detector("big_embryo", {"max_area": "75000"}, found)
    detectors = [cls() for cls in BUILTINS.values()] + list(found.values())
    snips = snips_from_store(store, npartitions=4)
    expected = _sorted(
        run_detectors(snips, detectors, store=store).compute(scheduler="sync")
    )
    with (
        distributed.LocalCluster(
            n_workers=2, processes=True, threads_per_worker=1, dashboard_address=None
        ) as cluster,
        distributed.Client(cluster) as client,
    ):
        got = _sorted(
            client.compute(run_detectors(snips, detectors, store=store)).result()
        )
    pd.testing.assert_frame_equal(got, expected)
    assert {"big_embryo", "ShortBody", "FrameGap"} <= set(got["detector"])


# ------------------------------------------------------------------------ CLI
@pytest.fixture
def store_file(tmp_path):
    path = tmp_path / "store.json"
    Store(hand_made_document()).save(path, backups=0)
    return path


def test_cli_detect_dry_run_and_report(store_file, tmp_path, capsys):
    before = store_file.read_bytes()
    out_csv = tmp_path / "flags.csv"
    code = main(
        [
            "detect",
            str(store_file),
            "--detector",
            "ShortTrack:min_snips=5",
            "--detector",
            "FrameGap",
            "--dry-run",
            "--report",
            str(out_csv),
        ]
    )
    assert code == 0
    assert store_file.read_bytes() == before
    report = pd.read_csv(out_csv)
    assert sorted(report["entity_id"]) == ["20240301_A02_e01_s0005", "20240301_A03_e01"]
    assert "ShortTrack" in capsys.readouterr().out


def test_cli_detect_merges_and_replaces(store_file):
    assert (
        main(
            [
                "detect",
                str(store_file),
                "--detectors-file",
                str(USER_FILE),
                "--detector",
                "NoEmbryo",
                "--quiet",
            ]
        )
        == 0
    )
    store = read_store(store_file)
    assert ("20240301_A04", "NO_EMBRYO") in _flags_by(store, "auto:NoEmbryo")
    assert _flags_by(store, "auto:big_embryo") == [
        ("20240301_A01_e01_s0005", "MASK_ON_EDGE")
    ]
    args = [
        "detect",
        str(store_file),
        "--detectors-file",
        str(USER_FILE),
        "--detector",
        "big_embryo:max_area=1e9",
        "--replace",
        "--quiet",
    ]
    assert main(args) == 0
    assert _flags_by(read_store(store_file), "auto:big_embryo") == []


def test_cli_detect_exit_codes(store_file, tmp_path, capsys):
    assert main(["detect", str(store_file), "--detector", "ShortTrak"]) == 2
    assert "did you mean 'ShortTrack'?" in capsys.readouterr().err
    broken = tmp_path / "detectors_broken.py"
    broken.write_text(
        "class Boom:\n    name = 'Boom'\n    level = 'snip'\n    value = 'MOTION_BLUR'\n"
        "    def __call__(self, part):\n        raise ValueError('no blur model')\n"
    )
    assert (
        main(
            [
                "detect",
                str(store_file),
                "--detectors-file",
                str(broken),
                "--detector",
                "ShortTrack",
                "--quiet",
            ]
        )
        == 1
    )
    err = capsys.readouterr().err
    assert (
        "Boom failed on partition 20240301_A01_e01_s0000..20240302_batch1_A01_e01_s0011: ValueError: no blur model"
        in err
    )
    assert _flags_by(read_store(store_file), "auto:ShortTrack") == [
        ("20240301_A03_e01", "SHORT_TRACK")
    ]
    before = store_file.read_bytes()
    assert (
        main(
            [
                "detect",
                str(store_file),
                "--detectors-file",
                str(broken),
                "--strict",
                "--quiet",
            ]
        )
        == 1
    )
    assert store_file.read_bytes() == before


def test_cli_lists_detectors(capsys):
    assert main(["detectors"]) == 0
    out = capsys.readouterr().out
    for name in BUILTINS:
        assert name in out
    assert "min_snips=10  (int) Flag embryos with fewer snips than this." in out
    assert "video_ids" not in out


def test_public_api():
    assert pipeline.run_detectors is run_detectors
    assert pipeline.detectors is det
    assert isinstance(ShortTrack(), pipeline.Detector)
    assert np.isnan(det._rolling_median(np.array([np.nan]), np.array([0]), 3)[0])
