"""`megatron-gate sweep --preset`: a documented regime as flag values that later flags override."""

from __future__ import annotations

import pytest

from megatron_gate.cli import build_parser
from megatron_gate.demo.sweep import PRESETS


def _parse(*flags: str):  # noqa: ANN202
    return build_parser("sweep").parse_args(["sweep", *flags])


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_sets_its_flags(name: str) -> None:
    args = _parse("--preset", name)
    for key, value in PRESETS[name].items():
        assert getattr(args, key) == value


def test_flags_given_with_the_preset_win_on_either_side() -> None:
    after = _parse("--preset", "evidence", "--steps", "7", "--seeds", "4")
    before = _parse("--steps", "9", "--preset", "evidence")
    assert (after.steps, after.seeds) == (7, "4")
    assert before.steps == 9
    assert after.bos and before.bos and after.lrs == PRESETS["evidence"]["lrs"]


def test_no_preset_keeps_the_sweep_defaults() -> None:
    args = _parse()
    assert args.preset is None and args.bos is False and args.steps == 100


def test_unknown_preset_is_refused(capsys) -> None:  # noqa: ANN001
    with pytest.raises(SystemExit) as exit_info:
        _parse("--preset", "nope")
    assert exit_info.value.code == 2
    assert "invalid choice: 'nope'" in capsys.readouterr().err
