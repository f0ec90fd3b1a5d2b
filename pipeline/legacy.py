"""Upgrade files of the earlier EmbryoMetadata tool to schema version 1.

Legacy files have no ``file_info.schema_version``; embryos carry ``genotypes``
keyed by gene, ``flags`` and ``treatments`` as objects, extra ``metadata`` and
``phenotypes`` keys; snips have no ``frame`` and bare ``_NNNN`` suffixes;
there is no ``death_frame``; timestamps lack a UTC offset. :func:`upgrade`
returns a new document in the current schema and a report of every change,
which the store prints and which is applied to disk on the next save.
"""

from __future__ import annotations

import re
from typing import Any

from pipeline import ids
from pipeline.schema import SCHEMA_VERSION, default_vocabulary

__all__ = ["is_legacy", "upgrade"]

_OFFSET = re.compile(r"(Z|[+-]\d{2}:\d{2})$")
_SEVERITY = {"low": "info", "medium": "warning", "high": "error", "critical": "error"}


def is_legacy(doc: Any) -> bool:
    """Tell whether *doc* was written by the earlier EmbryoMetadata tool.

    Parameters
    ----------
    doc : object
        A parsed JSON document.

    Returns
    -------
    bool
        True when the document has no ``file_info.schema_version`` but looks
        like an embryo store.

    Examples
    --------
    >>> is_legacy({"file_info": {"version": "1.0"}, "embryos": {}})
    True
    >>> is_legacy({"file_info": {"schema_version": 1}, "embryos": {}})
    False
    """
    if not isinstance(doc, dict) or "embryos" not in doc:
        return False
    info = doc.get("file_info")
    return not (isinstance(info, dict) and "schema_version" in info)


class _Report:
    def __init__(self) -> None:
        self.counts: dict[str, int] = {}

    def add(self, what: str, n: int = 1) -> None:
        self.counts[what] = self.counts.get(what, 0) + n

    def lines(self) -> list[str]:
        return [f"{what}: {n}" if n > 1 else what for what, n in self.counts.items()]


def _stamp(value: Any, report: _Report) -> Any:
    if isinstance(value, str) and value and not _OFFSET.search(value):
        report.add("timestamps without a UTC offset read as UTC (+00:00 appended)")
        return value.replace(" ", "T") + "+00:00"
    return value


def _clean(obj: dict[str, Any], allowed: tuple[str, ...], report: _Report, where: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in obj.items():
        if key not in allowed:
            report.add(f"dropped {where} key {key!r}")
        elif value is None or (key == "notes" and value == ""):
            continue
        else:
            out[key] = _stamp(value, report) if key == "timestamp" else value
    return out


def _flags(raw: Any, report: _Report) -> list[dict[str, Any]]:
    items = list(raw.values()) if isinstance(raw, dict) else list(raw or [])
    if isinstance(raw, dict) and raw:
        report.add("flags stored as an object turned into a list")
    out = []
    for flag in items:
        flag = _clean(flag, ("value", "author", "timestamp", "severity", "auto_generated", "notes", "confidence"), report, "flag")
        if flag.get("severity") in _SEVERITY:
            report.add(f"flag severity {flag['severity']!r} mapped to {_SEVERITY[flag['severity']]!r}")
            flag["severity"] = _SEVERITY[flag["severity"]]
        out.append(flag)
    return out


def upgrade(doc: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """Upgrade a legacy document to the current schema.

    Parameters
    ----------
    doc : dict
        A legacy document (see :func:`is_legacy`).

    Returns
    -------
    new_doc : dict
        The document in schema version 1.
    report : list of str
        What was changed, one line per kind of change with its count.

    Raises
    ------
    ValueError
        If an embryo has more than one genotype: the schema allows one, and
        choosing would lose data. The message names the embryo.
    """
    report = _Report()
    info = doc.get("file_info") or {}
    created = _stamp(info.get("created") or info.get("creation_time") or "1970-01-01T00:00:00+00:00", report)
    source = "upgraded from an EmbryoMetadata legacy file"
    if info.get("source_sam_annotation"):
        source += f" (source_sam_annotation={info['source_sam_annotation']})"
    new: dict[str, Any] = {
        "file_info": {
            "schema_version": SCHEMA_VERSION,
            "created": created,
            "last_updated": _stamp(info.get("last_updated") or created, report),
            "source": source,
        }
    }
    report.add(f"file_info rewritten for schema version {SCHEMA_VERSION}")
    vocab = default_vocabulary()
    legacy_vocab = doc.get("permitted_values") or {}
    # Keep every value the legacy file allowed, on top of the current defaults.
    for name, spec in (legacy_vocab.get("phenotypes") or {}).items():
        vocab["phenotypes"].setdefault(name, {k: v for k, v in spec.items() if k in ("description", "is_default", "exclusive", "terminal")})
    for name in legacy_vocab.get("genotypes") or {}:
        if name not in vocab["genotypes"]:
            vocab["genotypes"].append(name)
    new["permitted_values"] = vocab
    report.add("permitted_values rewritten in the current layout (legacy values kept)")
    embryos: dict[str, Any] = {}
    for eid, e in (doc.get("embryos") or {}).items():
        exp, video = ids.parse_embryo_id(eid)
        genotypes = e.get("genotypes") or {}
        if len(genotypes) > 1:
            msg = (
                f"legacy embryo {eid!r} has {len(genotypes)} genotypes ({', '.join(genotypes)}); "
                "schema version 1 allows one per embryo: keep one in the file and read it again"
            )
            raise ValueError(msg)
        genotype = None
        if genotypes:
            (gene, g), = genotypes.items()
            genotype = _clean(dict(g, value=g.get("value", gene)), ("value", "author", "timestamp", "confirmed", "allele", "zygosity", "confidence", "notes"), report, "genotype")
            genotype.setdefault("confirmed", False)
            report.add("genotypes keyed by gene turned into one genotype")
        treatments_raw = e.get("treatments") or {}
        treatments = list(treatments_raw.values()) if isinstance(treatments_raw, dict) else list(treatments_raw)
        treatments = [_clean(t, ("value", "author", "timestamp", "concentration", "temperature_celsius", "notes"), report, "treatment") for t in treatments]
        for key in ("metadata", "phenotypes"):
            if key in e:
                report.add(f"dropped embryo key {key!r}")
        snips: dict[str, Any] = {}
        death = None
        for sid, s in (e.get("snips") or {}).items():
            frame = s.get("frame")
            if frame is None:
                frame = ids.parse_snip_id(sid).frame
                report.add("snip frame parsed from its id")
            pheno = _clean(s.get("phenotype") or {}, ("value", "author", "timestamp", "confidence", "notes"), report, "phenotype")
            snip = {"frame": frame, "phenotype": pheno, "flags": _flags(s.get("flags"), report)}
            if s.get("measurements"):
                snip["measurements"] = s["measurements"]
            snips[sid] = snip
            if pheno.get("value") == "DEAD" and (death is None or frame < death):
                death = frame
        if death is not None:
            report.add("death_frame computed from DEAD snips")
        source = {"experiment_id": (e.get("source") or {}).get("experiment_id", exp), "video_id": (e.get("source") or {}).get("video_id", video)}
        if set(e.get("source") or {}) - {"experiment_id", "video_id"}:
            report.add("dropped extra embryo source keys")
        embryos[eid] = {
            "source": source,
            "genotype": genotype,
            "treatments": treatments,
            "death_frame": death,
            "flags": _flags(e.get("flags"), report),
            "snips": snips,
        }
    new["embryos"] = embryos
    flags = doc.get("flags") or {}
    new["flags"] = {level: {k: _flags(v, report) for k, v in (flags.get(level) or {}).items()} for level in ("experiment", "video", "image")}
    for key in doc:
        if key not in ("file_info", "permitted_values", "embryos", "flags"):
            report.add(f"dropped top-level key {key!r}")
    return new, report.lines()
