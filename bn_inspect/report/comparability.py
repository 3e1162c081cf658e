"""Why two inspection reports may differ for reasons other than the model: data, mode, dtype, device, versions."""

from __future__ import annotations

from bn_inspect.report.records import InputInfo, Report


def comparability_notes(old: Report, new: Report, names: tuple[str, str] = ("OLD", "NEW")) -> list[str]:
    """Why the batch statistics of ``old`` and ``new`` may differ for reasons other than the model.

    ``names`` call the two reports in the notes ("OLD" and "NEW"; check says "the baseline" and "this run").
    """
    was, now = names
    notes = []
    if old.mode != new.mode:
        notes.append(f"{was} ran in {old.mode} mode and {now} in {new.mode} mode: the reports are not comparable")
    if old.input.dtype != new.input.dtype:
        notes.append(f"{was} ran in {old.input.dtype} and {now} in {new.input.dtype}: expect rounding differences")
    if old.device.raw.split(":")[0] != new.device.raw.split(":")[0]:
        notes.append(f"{was} ran on {old.device} and {now} on {new.device}: expect rounding differences")
    notes += _data_notes(old.input, new.input, names)
    versions = [
        f"{name} {a} → {b}"
        for name, a, b in (
            ("torch", old.torch_version, new.torch_version),
            ("bn-inspect", old.bn_inspect_version, new.bn_inspect_version),
        )
        if a and b and a != b
    ]
    if versions:
        notes.append(f"the reports were written by other versions ({', '.join(versions)})")
    if old.model.sha256 and old.model.sha256 == new.model.sha256:
        notes.append(f"{was} and {now} are the same model file (equal SHA-256): running statistics cannot have changed")
    return notes


def _data_notes(old: InputInfo, new: InputInfo, names: tuple[str, str]) -> list[str]:
    """Notes on whether both reports ran the same data, by its fingerprint."""
    if old.is_random != new.is_random:
        return ["one report ran on random input and the other on data: batch statistics are not comparable"]
    if old.first_batch_sha256 is None or new.first_batch_sha256 is None:
        return [
            "a report has no data fingerprint (written by an older bn-inspect): whether both ran the same data "
            "cannot be told"
        ]
    # Other dtypes give other bytes for the same data: the dtype note says it already.
    other_first = old.dtype == new.dtype and old.first_batch_sha256 != new.first_batch_sha256
    differences = [
        what
        for what, differs in (
            (f"{old.num_samples:,} vs {new.num_samples:,} samples", old.num_samples != new.num_samples),
            ("another first batch", other_first),
        )
        if differs
    ]
    if differences:
        return [
            f"{names[0]} and {names[1]} ran other data ({', '.join(differences)}): batch statistic changes may be "
            "data drift, not a change of the model"
        ]
    return []
