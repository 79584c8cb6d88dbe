"""Finding ai-toolkit's own samples of a run (previewd.aitk_samples)."""

from previewd.aitk_samples import find_samples


def test_newest_set_wins_and_hidden_folders_are_ignored(tmp_path):
    samples = tmp_path / "samples"
    (samples / ".tmp").mkdir(parents=True)
    (samples / ".thumbs").mkdir()
    for name in ("1724085406830__000000250_0.jpg", "1724085499999__000000250_0.jpg",
                 "1724085406830__000000250_1.jpg", "1724085406830__000000500_0.jpg"):
        (samples / name).write_bytes(b"x")
    (samples / ".tmp" / "1800000000000__000000250_0.jpg").write_bytes(b"x")
    (samples / ".thumbs" / "1800000000000__000000250_0.jpg").write_bytes(b"x")
    found = find_samples(tmp_path)
    assert found[(250, 0)] == samples / "1724085499999__000000250_0.jpg"
    assert found[(250, 1)].name == "1724085406830__000000250_1.jpg"
    assert (750, 0) not in found


def test_extension_as_the_config_spells_it(tmp_path):
    samples = tmp_path / "samples"
    samples.mkdir()
    (samples / "1724085406830__000000250_0.JPG").write_bytes(b"x")
    (samples / "1724085406830__000000250_1.jpeg").write_bytes(b"x")
    assert set(find_samples(tmp_path)) == {(250, 0), (250, 1)}


def test_a_run_without_samples_has_none(tmp_path):
    assert find_samples(tmp_path) == {}
