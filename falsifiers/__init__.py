"""Falsifier modules: each registers its falsifiers and subjects on import.

Every module of this package is imported here (found with ``pkgutil``, so a
module that a colleague has not written yet simply isn't there). A module that
fails to import is recorded in ``harness.registry.BINDING_ERRORS`` and its
names stay UNBOUND; the report shows the error instead of a silent gap.
"""

from __future__ import annotations

import importlib
import pkgutil
import traceback

from harness import registry

# The interface table of docs/ARCHITECTURE.md: names a contract may use before
# their code exists (such items are UNBOUND). Any other unregistered name in a
# contract is a typo and a collection error.
registry.plan(
    falsifiers=(
        "no_dequant_on_load",
        "peak_gpu_memory",
        "logit_parity",
        "frozen_teacher",
        "distill_epoch",
        "first_kd_step",
        "vocab_size_reports_effective",
        "target_vocab_validation",
        "logits_effective_length",
        "effective_vocab_property",
        "truncation_preserves_order",
        "softmax_support",
        "kd_loss_truncated_support",
    ),
    subjects=(
        "q4k-teacher",
        "dequant-teacher",
        "dequant-teacher-cuda",
        "q4k-teacher-corrupt-decode",
        "trainable-teacher",
        "aligned-pair",
        "unaligned-pair",
        "provider-reports-native",
        "provider-skips-size-check",
        "provider-no-truncate",
        "reference-alignment",
        "dispatch-missing-error-arm",
        "truncate-wrong-end",
        "truncate-after-softmax",
        "kd-loss-full-support",
    ),
)


def _import_all() -> None:
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        name = f"{__name__}.{info.name}"
        try:
            importlib.import_module(name)
        except Exception:
            registry.BINDING_ERRORS[name] = traceback.format_exc(limit=8)


_import_all()
