"""Export (issue 6): Parquet, Feather, HDF5 and CSV, atomic and with provenance."""

from __future__ import annotations

import json
import pickle
import re
from pathlib import Path

import dask.dataframe as dd
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
from pyarrow import feather

import pipeline
from pipeline import export
from pipeline.cli import main
from pipeline.export import (
    PROVENANCE_KEY,
    ExportError,
    export_store,
    part_name,
    prepare_partition,
    read_table,
    write_parquet,
    write_table,
)
from pipeline.schema import STRING
from pipeline.testing import make_store

SYNC = "sync"


@pytest.fixture(scope="module")
def store_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("store") / "store.json"
    make_store(n_experiments=3, n_embryos=6, n_frames=8, seed=3).save(path)
    return path


@pytest.fixture(scope="module")
def store(store_file: Path) -> pipeline.Store:
    return pipeline.read_store(store_file)


@pytest.fixture(scope="module")
def table(store: pipeline.Store) -> pd.DataFrame:
    return store.snip_table()


def normalise(frame: pd.DataFrame, like: pd.DataFrame) -> pd.DataFrame:
    """Undo what hive partitioning does to a round trip.

    The partition column comes back last, as a categorical (pandas, Dask) or
    as pandas' default ``str`` (pyarrow.dataset); pyarrow rebuilds the
    ``snip_id`` index as ``str`` too; rows come back grouped by folder.
    """
    if "snip_id" in frame.columns:
        frame = frame.set_index("snip_id")
    frame.index = frame.index.astype(STRING)
    for col in frame.columns:
        dtype = frame[col].dtype
        if isinstance(dtype, pd.CategoricalDtype) or (
            pd.api.types.is_string_dtype(dtype) and dtype != STRING
        ):
            frame[col] = frame[col].astype(STRING)
    return frame[list(like.columns)].sort_index()


def snapshot(folder: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(folder)): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def siblings(out: Path) -> list[str]:
    return sorted(
        p.name for p in out.parent.iterdir() if p.name.startswith(out.name + ".")
    )


# ----------------------------------------------------------------- parquet reads
@pytest.mark.parametrize("npartitions", [1, 4], ids=["one-part", "four-parts"])
def test_parquet_round_trips_through_pandas(tmp_path, store, table, npartitions):
    out = tmp_path / "snips"
    result = write_parquet(
        pipeline.snips_from_store(store, npartitions=npartitions),
        out,
        store=store,
        scheduler=SYNC,
    )
    assert result.rows == len(table)
    back = pd.read_parquet(out)
    # Hive partition columns come back categorical (documented).
    assert isinstance(back["experiment_id"].dtype, pd.CategoricalDtype)
    pd.testing.assert_frame_equal(normalise(back, table), table)
    pd.testing.assert_frame_equal(read_table(out), table)


def test_parquet_keeps_dtypes(tmp_path, store, table):
    out = tmp_path / "snips"
    write_parquet(
        pipeline.snips_from_store(store, npartitions=2),
        out,
        store=store,
        scheduler=SYNC,
    )
    back = pd.read_parquet(out)
    assert back["video_id"].dtype == STRING
    assert back["death_frame"].dtype == pd.Int64Dtype()
    assert back["is_dead"].dtype == bool
    assert back["genotype_confirmed"].dtype == bool
    assert back["genotype"].isna().sum() == table["genotype"].isna().sum()


def test_parquet_pyarrow_dataset_with_partition_filter(tmp_path, store, table):
    out = tmp_path / "snips"
    write_parquet(
        pipeline.snips_from_store(store, npartitions=3),
        out,
        store=store,
        scheduler=SYNC,
    )
    experiment = table["experiment_id"].iloc[-1]
    dataset = ds.dataset(out, partitioning="hive")
    got = dataset.to_table(filter=ds.field("experiment_id") == experiment).to_pandas()
    want = table[table["experiment_id"] == experiment]
    assert len(got) == len(want) > 0
    pd.testing.assert_frame_equal(normalise(got, want), want)


# Dask's own reader calls reset_index(inplace=True), which pandas 3.1 deprecates.
@pytest.mark.filterwarnings(
    "ignore:The inplace keyword in DataFrame:DeprecationWarning"
)
def test_parquet_dask_read_with_filters(tmp_path, store, table):
    out = tmp_path / "snips"
    write_parquet(
        pipeline.snips_from_store(store, npartitions=3),
        out,
        store=store,
        scheduler=SYNC,
    )
    experiment = table["experiment_id"].iloc[0]
    lazy = dd.read_parquet(out, filters=[("experiment_id", "==", experiment)])
    got = lazy.compute(scheduler=SYNC)
    want = table[table["experiment_id"] == experiment]
    pd.testing.assert_frame_equal(normalise(got, want), want)


# ------------------------------------------------------------ layout, provenance
def test_parquet_layout_sorts_and_has_no_empty_files(tmp_path, store, table):
    out = tmp_path / "snips"
    result = write_parquet(
        pipeline.snips_from_store(store, npartitions=4),
        out,
        store=store,
        scheduler=SYNC,
    )
    folders = sorted(p.name for p in out.iterdir())
    assert folders == sorted(
        f"experiment_id={e}" for e in table["experiment_id"].unique()
    )
    files = sorted(out.rglob("*.parquet"))
    assert len(files) == result.files
    assert all(re.fullmatch(r"part\.\d{5}\.parquet", f.name) for f in files)
    assert all(pq.read_metadata(f).num_rows > 0 for f in files)


def test_categorical_partition_column_writes_no_folder_for_unobserved_values(
    tmp_path, table
):
    part = table.copy()
    part["experiment_id"] = pd.Categorical(
        part["experiment_id"],
        categories=[*part["experiment_id"].unique(), "19990101_never"],
    )
    out = tmp_path / "snips"
    write_parquet(dd.from_pandas(part, npartitions=2), out, scheduler=SYNC)
    assert not (out / "experiment_id=19990101_never").exists()
    assert all(pq.read_metadata(f).num_rows > 0 for f in out.rglob("*.parquet"))
    pd.testing.assert_frame_equal(read_table(out), table)


def _files(folder: Path) -> dict[str, pa.Table]:
    return {str(f.relative_to(folder)): pq.read_table(f) for f in sorted(folder.rglob("*.parquet"))}


@pytest.mark.parametrize(
    ("what", "partition_on", "columns"),
    [
        ("snips", ("experiment_id",), None),
        ("snips", ("experiment_id", "video_id"), ["phenotype", "frame"]),
        ("snips", (), None),
        ("flags", ("level",), None),
    ],
)
def test_parquet_files_equal_those_of_dasks_own_engine(tmp_path, monkeypatch, store, what, partition_on, columns):
    # export._ArrowEngine converts each partition once and splits it in
    # Arrow; Dask's own engine writes the same files (names, rows, schema,
    # pandas metadata), but for the export time in the provenance.
    source = pipeline.snips_from_store(store, npartitions=3) if what == "snips" else dd.from_pandas(store.flags_table(), npartitions=2)
    ours, dasks = tmp_path / "ours", tmp_path / "dasks"
    write_parquet(source, ours, partition_on=partition_on, columns=columns, scheduler="threads")
    monkeypatch.setattr(export, "_ArrowEngine", "pyarrow")
    write_parquet(source, dasks, partition_on=partition_on, columns=columns, scheduler="threads")
    mine, theirs = _files(ours), _files(dasks)
    assert list(mine) == list(theirs)
    assert len(mine) > 1
    for name, table in mine.items():
        other = theirs[name]
        assert table.equals(other), name
        meta, other_meta = dict(table.schema.metadata), dict(other.schema.metadata)
        assert json.loads(meta.pop(PROVENANCE_KEY))["columns"] == json.loads(other_meta.pop(PROVENANCE_KEY))["columns"]
        assert meta == other_meta, name


def test_partitions_in_key_order_are_cut_into_slices_and_others_sorted(tmp_path):
    from pipeline.export import _in_key_order

    table = pa.table({"a": ["x", "x", "y", "y"], "b": ["2", "3", "1", "1"], "c": [1, 2, 3, 4]})
    assert _in_key_order(table, ["a"])
    assert _in_key_order(table, ["a", "b"])
    assert not _in_key_order(table, ["b"])
    assert not _in_key_order(table, ["b", "a"])
    assert not _in_key_order(table.take([1, 0, 2, 3]), ["a", "b"])
    assert _in_key_order(table.slice(0, 1), ["b"])
    # Both ways give the files Dask's engine writes (see the test above);
    # here, the same rows per group whether the partition is in order or not.
    frame = pd.DataFrame({"experiment_id": ["e2", "e1", "e2", "e1"], "v": [1, 2, 3, 4]})
    shuffled, ordered = tmp_path / "shuffled", tmp_path / "ordered"
    write_parquet(dd.from_pandas(frame, npartitions=1), shuffled, scheduler=SYNC)
    in_order = frame.sort_values("experiment_id", kind="stable", ignore_index=True)
    write_parquet(dd.from_pandas(in_order, npartitions=1), ordered, scheduler=SYNC)

    def values(folder: Path, experiment: str) -> list[int]:
        files = sorted((folder / f"experiment_id={experiment}").glob("*.parquet"))
        return [v for f in files for v in pq.read_table(f)["v"].to_pylist()]

    assert values(shuffled, "e1") == [2, 4]
    assert values(shuffled, "e2") == [1, 3]
    assert values(ordered, "e1") == [2, 4]  # in_order keeps the rows' order within each experiment
    assert values(ordered, "e2") == [1, 3]


def test_the_engine_collects_metadata_as_dasks_own(tmp_path, store):
    # write_parquet writes no _metadata file, but the engine can: Dask's
    # to_parquet with it gives the same summary file as with Dask's engine.
    snips = pipeline.snips_from_store(store, npartitions=3)
    for engine, out in ((export._ArrowEngine, tmp_path / "ours"), ("pyarrow", tmp_path / "dasks")):
        with export._dask_writer_warnings():  # pandas' deprecation of Dask's inplace calls
            snips.to_parquet(out, engine=engine, partition_on=["experiment_id"], write_metadata_file=True)
    ours, dasks = pq.read_metadata(tmp_path / "ours" / "_metadata"), pq.read_metadata(tmp_path / "dasks" / "_metadata")
    assert ours.num_rows == dasks.num_rows == store.counts()["snips"]
    assert ours.num_row_groups == dasks.num_row_groups > 1
    paths = [[m.row_group(i).column(0).file_path for i in range(m.num_row_groups)] for m in (ours, dasks)]
    assert sorted(paths[0]) == sorted(paths[1])
    assert ours.schema.to_arrow_schema().equals(dasks.schema.to_arrow_schema())


def test_provenance_in_every_file(tmp_path, store, store_file):
    out = tmp_path / "snips"
    write_parquet(
        pipeline.snips_from_store(store, npartitions=2),
        out,
        store=store,
        columns=["phenotype"],
        scheduler=SYNC,
    )
    for f in out.rglob("*.parquet"):
        info = json.loads(pq.read_schema(f).metadata[PROVENANCE_KEY])
        assert info["store_path"] == str(store_file.resolve())
        assert info["store_last_updated"] == store.doc["file_info"]["last_updated"]
        assert info["package_version"] == pipeline.__version__
        assert info["exported_at"].endswith("+00:00")
        assert info["partition_on"] == ["experiment_id"]
        assert info["columns"] == ["snip_id", "phenotype", "experiment_id"]


def test_columns_subset_and_no_partitioning(tmp_path, store, table):
    out = tmp_path / "snips"
    result = write_parquet(
        pipeline.snips_from_store(store, npartitions=2),
        out,
        partition_on=(),
        columns=["genotype", "death_frame"],
        scheduler=SYNC,
    )
    assert sorted(p.name for p in out.iterdir()) == [
        "part.00000.parquet",
        "part.00001.parquet",
    ]
    assert result.partition_on == []
    pd.testing.assert_frame_equal(read_table(out), table[["genotype", "death_frame"]])


# ------------------------------------------------------------------ atomic swap
def test_export_twice_replaces_the_previous_export(tmp_path, store, table):
    out = tmp_path / "snips"
    snips = pipeline.snips_from_store(store, npartitions=2)
    write_parquet(snips, out, store=store, scheduler=SYNC)
    write_parquet(snips, out, store=store, columns=["phenotype"], scheduler=SYNC)
    assert list(read_table(out).columns) == ["phenotype", "experiment_id"]
    assert siblings(out) == []


def test_failed_export_leaves_previous_intact(tmp_path, store):
    out = tmp_path / "snips"
    snips = pipeline.snips_from_store(store, npartitions=3)
    write_parquet(snips, out, store=store, scheduler=SYNC)
    before = snapshot(out)

    with pytest.raises(ExportError, match="unknown column"):
        write_parquet(snips, out, store=store, columns=["bogus"], scheduler=SYNC)

    def explode(part: pd.DataFrame) -> pd.DataFrame:
        # Later partitions fail, after the first one was written.
        if part.index[0] > snips.divisions[1]:
            msg = "injected failure"
            raise RuntimeError(msg)
        return part

    broken = snips.map_partitions(explode, meta=snips._meta)
    with pytest.raises(RuntimeError, match="injected failure"):
        write_parquet(broken, out, store=store, scheduler=SYNC)
    assert snapshot(out) == before
    assert siblings(out) == []


def test_failed_swap_puts_the_previous_export_back(tmp_path, store, monkeypatch):
    out = tmp_path / "snips"
    snips = pipeline.snips_from_store(store, npartitions=2)
    write_parquet(snips, out, scheduler=SYNC)
    before = snapshot(out)
    real_rename = export.os.rename

    def rename(src, dst):
        if ".tmp-" in str(src):
            msg = "disk full"
            raise OSError(msg)
        return real_rename(src, dst)

    monkeypatch.setattr(export.os, "rename", rename)
    with pytest.raises(OSError, match="disk full"):
        write_parquet(snips, out, scheduler=SYNC)
    assert snapshot(out) == before
    assert siblings(out) == []


# -------------------------------------------------------------------- refusals
def test_refuses_to_touch_the_source(tmp_path, store, store_file):
    snips = pipeline.snips_from_store(store)
    backups = store_file.parent / f".{store_file.name}.backups"
    for target, why in [
        (store_file, "source store"),
        (backups / "x", "backups"),
        (store_file.parent, "contains the source store"),
    ]:
        with pytest.raises(ExportError, match=why):
            write_parquet(snips, target, store=store, scheduler=SYNC)
        with pytest.raises(ExportError):
            write_table(snips, target, "csv", store=store)
    assert pipeline.read_store(store_file).counts() == store.counts()


def test_refuses_folders_that_are_not_exports(tmp_path, store):
    snips = pipeline.snips_from_store(store)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(ExportError, match="not part of a Parquet export"):
        write_parquet(snips, tmp_path / "mine", scheduler=SYNC)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    (tmp_path / "file").write_text("x")
    with pytest.raises(ExportError, match="is a file"):
        write_parquet(snips, tmp_path / "file", scheduler=SYNC)


def test_partition_column_checks(tmp_path, store, table):
    snips = pipeline.snips_from_store(store, npartitions=1)
    n_missing = int(table["genotype"].isna().sum())
    assert n_missing > 0
    with pytest.raises(
        ExportError, match=rf"'genotype': {n_missing} row\(s\).*no missing values"
    ):
        write_parquet(snips, tmp_path / "a", partition_on=["genotype"], scheduler=SYNC)
    with pytest.raises(ExportError, match="'frame': it holds int64"):
        write_parquet(snips, tmp_path / "b", partition_on=["frame"], scheduler=SYNC)
    with pytest.raises(ExportError, match=r"'embryo_id': it has .* distinct values"):
        write_parquet(
            snips,
            tmp_path / "c",
            partition_on=["embryo_id"],
            max_partition_values=5,
            scheduler=SYNC,
        )
    with pytest.raises(ExportError, match="no such column"):
        write_parquet(snips, tmp_path / "d", partition_on=["nope"], scheduler=SYNC)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_global_cardinality_is_checked_across_partitions(tmp_path, store, table):
    snips = pipeline.snips_from_store(store, npartitions=3)
    n = table["experiment_id"].nunique()
    with pytest.raises(ExportError, match=f"it has {n} distinct values"):
        write_parquet(snips, tmp_path / "a", max_partition_values=n - 1, scheduler=SYNC)
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------- single files
@pytest.mark.parametrize("fmt", ["feather", "hdf5", "csv"])
def test_single_file_round_trip(tmp_path, store, table, fmt):
    out = tmp_path / f"snips.{ {'hdf5': 'h5'}.get(fmt, fmt) }"
    result = write_table(
        pipeline.snips_from_store(store, npartitions=2),
        out,
        fmt,
        store=store,
        scheduler=SYNC,
    )
    assert result.rows == len(table)
    assert result.files == 1
    pd.testing.assert_frame_equal(read_table(out), table)
    # A second export replaces the file atomically; nothing is left beside it.
    write_table(table, out, fmt, columns=["phenotype", "death_frame"])
    pd.testing.assert_frame_equal(read_table(out), table[["phenotype", "death_frame"]])
    assert sorted(p.name for p in tmp_path.iterdir()) == [out.name]


def test_feather_and_hdf5_carry_provenance(tmp_path, store, table):
    write_table(table, tmp_path / "a.feather", "feather", store=store)
    back = pd.read_feather(tmp_path / "a.feather")
    pd.testing.assert_frame_equal(normalise(back, table), table)
    info = json.loads(
        feather.read_table(tmp_path / "a.feather").schema.metadata[PROVENANCE_KEY]
    )
    assert info["store_last_updated"] == store.doc["file_info"]["last_updated"]
    write_table(table, tmp_path / "a.h5", "hdf5", store=store)
    with pd.HDFStore(tmp_path / "a.h5", mode="r") as h5:
        info = json.loads(h5.get_storer("table").attrs.embryo_pipeline)
    assert info["format"] == "hdf5"


# ------------------------------------------------------------ flags, changes
def test_flags_export_long_format(tmp_path, store):
    flags = store.flags_table()
    assert set(flags["level"]) >= {"snip", "embryo"}
    out = tmp_path / "flags"
    result = export_store(store, out, what="flags", scheduler=SYNC)
    assert result.partition_on == ["level"]
    assert sorted(p.name for p in out.iterdir()) == sorted(
        f"level={v}" for v in flags["level"].unique()
    )
    key = ["level", "entity_id", "flag"]
    want = flags.sort_values(key, ignore_index=True)
    pd.testing.assert_frame_equal(
        read_table(out).sort_values(key, ignore_index=True), want
    )
    export_store(store, tmp_path / "flags.csv", what="flags", format="csv")
    pd.testing.assert_frame_equal(
        read_table(tmp_path / "flags.csv").sort_values(key, ignore_index=True), want
    )


def test_changes_export(tmp_path, store):
    from pipeline.changelog import append_record, read_changelog

    path = tmp_path / "store.json"
    store.save(path)
    with pytest.raises(ExportError, match="no change log"):
        export_store(path, tmp_path / "changes", what="changes")
    append_record(
        path,
        {
            "batch_id": "b-1",
            "kind": "phenotypes",
            "author": "alee",
            "timestamp": "2026-01-05T10:00:00+00:00",
            "changes": [
                [
                    "snip",
                    "some_snip",
                    "phenotype",
                    {"value": "NONE"},
                    {"value": "EDEMA"},
                ]
            ],
        },
    )
    result = export_store(path, tmp_path / "changes", what="changes", scheduler=SYNC)
    assert result.rows == 1
    assert result.provenance["store_path"] == str(path.resolve())
    pd.testing.assert_frame_equal(
        read_table(tmp_path / "changes"), read_changelog(path)
    )


# ---------------------------------------------------------------------- misc
def test_prepare_partition_is_picklable_and_names_sort():
    assert pickle.loads(pickle.dumps(prepare_partition)) is prepare_partition
    assert pickle.loads(pickle.dumps(part_name)) is part_name
    assert sorted(part_name(i) for i in (10, 2, 100)) == [
        part_name(2),
        part_name(10),
        part_name(100),
    ]


@pytest.mark.distributed
def test_parquet_with_process_workers(tmp_path, store, table):
    out = tmp_path / "snips"
    write_parquet(
        pipeline.snips_from_store(store, npartitions=2),
        out,
        store=store,
        scheduler="processes",
    )
    pd.testing.assert_frame_equal(read_table(out), table)


# ------------------------------------------------------------------------- CLI
def test_cli_export(tmp_path, store_file, table, capsys):
    out = tmp_path / "snips"
    assert main(["export", str(store_file), str(out), "--npartitions", "2"]) == 0
    assert f"wrote {len(table):,} rows" in capsys.readouterr().out
    pd.testing.assert_frame_equal(read_table(out), table)
    assert (
        main(
            [
                "export",
                str(store_file),
                str(tmp_path / "s.csv"),
                "--format",
                "csv",
                "--columns",
                "phenotype,genotype",
                "--quiet",
            ]
        )
        == 0
    )
    assert capsys.readouterr().out == ""
    pd.testing.assert_frame_equal(
        read_table(tmp_path / "s.csv"), table[["phenotype", "genotype"]]
    )
    assert (
        main(
            [
                "export",
                str(store_file),
                str(tmp_path / "g"),
                "--partition-on",
                "experiment_id",
                "--partition-on",
                "phenotype",
                "--quiet",
            ]
        )
        == 0
    )
    assert any(
        p.name.startswith("phenotype=")
        for p in next((tmp_path / "g").iterdir()).iterdir()
    )


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--columns", "bogus"], "unknown column"),
        (["--partition-on", "frame"], "hive partition columns"),
        (["--format", "csv", "--partition-on", "experiment_id"], "parquet only"),
        (["--what", "changes"], "no change log"),
        (["--npartitions", "0"], "at least 1"),
    ],
    ids=[
        "unknown-column",
        "int-partition",
        "csv-partition",
        "no-changelog",
        "npartitions",
    ],
)
def test_cli_unusable_input_exits_2(tmp_path, store_file, capsys, extra, message):
    assert main(["export", str(store_file), str(tmp_path / "out"), *extra]) == 2
    assert message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_cli_conflicting_or_missing_paths_exit_2(tmp_path, store_file, capsys):
    assert main(["export", str(tmp_path / "missing.json"), str(tmp_path / "out")]) == 2
    assert "no such file" in capsys.readouterr().err
    assert main(["export", str(store_file), str(store_file.parent)]) == 2
    assert "contains the source store" in capsys.readouterr().err
