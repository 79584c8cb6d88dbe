import pytest

from previewd.intake.prompt_flags import (PromptFlagError, aitk_seeds, floor_size, inject_trigger,
                                          parse_prompt_flags, torch_seed)


def test_trigger_replaces_trigger_and_name_only_when_set():
    assert inject_trigger("[trigger] at [name]", "p3r5on") == "p3r5on at p3r5on"
    assert inject_trigger("[trigger] dog", None) == "[trigger] dog"
    assert inject_trigger("a dog", "p3r5on") == "a dog"  # never prepended
    assert inject_trigger("[trigger] dog", "") == " dog"


def test_flags_parsed_like_ai_toolkit():
    f = parse_prompt_flags("  a cat --n blurry, ugly --w 1000 --h 520 --seed 7 --cfg 2.5 --steps 12 --m 0.5  ")
    assert (f.prompt, f.neg, f.width, f.height, f.seed) == ("a cat", "blurry, ugly", 1000, 520, 7)
    assert (f.guidance_scale, f.sample_steps, f.network_multiplier) == (2.5, 12, 0.5)


def test_short_aliases_last_wins_and_unknown_dropped():
    f = parse_prompt_flags("x --d 1 --l 3 --s 4 --d 9 --gr 0.7 --fps 8 --ctrl_img /a b.png")
    assert (f.seed, f.guidance_scale, f.sample_steps) == (9, 3.0, 4)
    assert f.ctrl_img == "/a b.png"
    assert f.dropped == ("gr", "fps")


def test_any_double_dash_starts_a_flag():
    f = parse_prompt_flags("a well--known face")
    assert f.prompt == "a well"
    assert f.dropped == ("known",)


def test_no_flags_strips_only():
    f = parse_prompt_flags("  plain prompt \n")
    assert f.prompt == "plain prompt" and f.width is None and f.dropped == ()


@pytest.mark.parametrize("text", ["x --w 1.5", "x --seed abc", "x --cfg high"])
def test_bad_flag_value(text):
    with pytest.raises(PromptFlagError, match="--"):
        parse_prompt_flags(text)


def test_floor_size():
    assert [floor_size(v) for v in (1024, 1030, 12, 64, 71)] == [1024, 1024, 64, 64, 64]


def test_seeds_walk_and_carry_over():
    assert aitk_seeds(42, True, [None, None, None]) == [42, 43, 44]
    assert aitk_seeds(42, True, [None, 7, None]) == [42, 7, 44]
    # without walk_seed an item's seed persists to the following items
    assert aitk_seeds(42, False, [None, 7, None, 3, None]) == [42, 7, 7, 3, 3]


def test_torch_seed_wraps_negatives_like_torch_and_refuses_what_torch_refuses():
    assert [torch_seed(s) for s in (0, 42, -1, -2**63, 2**64 - 1)] == [0, 42, 2**64 - 1, 2**63, 2**64 - 1]
    for bad in (2**64, -2**63 - 1):
        with pytest.raises(ValueError, match="torch.manual_seed"):
            torch_seed(bad)
