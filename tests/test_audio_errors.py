"""Bad audio says what it is: a cut or undecodable file is "not readable audio: ..." naming the
problem, never "silent", and never scored from what is left of it."""

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

import features
import utils

SR = 16000
NOT_READABLE = "not readable audio: "


def load_error(path: Path) -> features.AudioError:
    with pytest.raises(features.AudioError) as caught:
        features.load_audio(path, SR)
    assert str(caught.value).startswith(NOT_READABLE), caught.value
    assert "silent" not in str(caught.value)
    return caught.value


def cut(source: Path, out: Path, keep: int) -> Path:
    """The first `keep` bytes of source, as out."""
    out.write_bytes(source.read_bytes()[:keep])
    return out


@pytest.fixture(scope="module")
def real_files(shared_data) -> dict[str, Path]:
    """One real Common Voice MP3 and one LibriSpeech Opus file, each with audio in it."""
    return {"mp3": sorted((shared_data / "commonvoice").rglob("*.mp3"))[0],
            "opus": sorted((shared_data / "librispeech").rglob("*.opus"))[0]}


@pytest.fixture
def wav_file(tmp_path) -> Path:
    rng = np.random.default_rng(0)
    path = tmp_path / "tone.wav"
    sf.write(path, 0.3 * np.sin(np.arange(SR) * 0.07) + 0.01 * rng.standard_normal(SR), SR,
             subtype="PCM_16")
    return path


@pytest.mark.parametrize("kind", ["mp3", "opus"])
@pytest.mark.parametrize("fraction", [0.6, 0.9])
def test_real_file_cut_short_is_not_readable(real_files, tmp_path, kind, fraction):
    source = real_files[kind]
    assert len(features.load_audio(source, SR)) > SR  # the whole file is fine
    error = load_error(cut(source, tmp_path / f"cut.{kind}", int(source.stat().st_size * fraction)))
    assert error.kind == "truncated"
    assert "cut short" in str(error)


@pytest.mark.parametrize("kind", ["mp3", "opus"])
def test_real_file_cut_to_300_bytes_is_not_readable(real_files, tmp_path, kind):
    error = load_error(cut(real_files[kind], tmp_path / f"cut.{kind}", 300))
    assert error.kind == "truncated"


def test_ogg_cut_at_a_page_boundary_misses_its_end_of_stream(real_files, tmp_path):
    data = real_files["opus"].read_bytes()
    out = tmp_path / "cut.opus"
    out.write_bytes(data[:data.rfind(b"OggS")])  # everything before the last page
    assert "no end-of-stream page" in str(load_error(out))


def test_mp3_cut_inside_its_id3_tag(real_files, tmp_path):
    data = real_files["mp3"].read_bytes()
    assert data[:3] == b"ID3"
    error = load_error(cut(real_files["mp3"], tmp_path / "cut.mp3", 20))
    assert "ID3 tag" in str(error)


def test_mp3_with_a_trailing_id3v1_tag_is_read_whole(real_files, tmp_path):
    path = tmp_path / "tagged.mp3"
    path.write_bytes(real_files["mp3"].read_bytes() + b"TAG" + b"\0" * 125)
    np.testing.assert_array_equal(features.load_audio(path, SR),
                                  features.load_audio(real_files["mp3"], SR))


@pytest.mark.parametrize("keep", [0.6, 300])
def test_wav_cut_short_is_not_readable(wav_file, tmp_path, keep):
    size = wav_file.stat().st_size
    error = load_error(cut(wav_file, tmp_path / "cut.wav", int(size * keep) if keep < 1 else keep))
    assert error.kind == "truncated"
    assert "data chunk declares" in str(error)


def test_flac_cut_short_is_not_readable(shared_data, tmp_path):
    source = sorted((shared_data / "speechocean762").rglob("*.flac"))[0]
    error = load_error(cut(source, tmp_path / "cut.flac", int(source.stat().st_size * 0.6)))
    assert "cut short" in str(error)


@pytest.mark.parametrize("suffix", utils.AUDIO_EXTENSIONS)
def test_empty_and_garbage_files_are_not_readable(tmp_path, suffix):
    empty = tmp_path / f"empty{suffix}"
    empty.write_bytes(b"")
    assert "empty file" in str(load_error(empty))
    garbage = tmp_path / f"garbage{suffix}"
    garbage.write_bytes(np.random.default_rng(0).bytes(5000))
    assert f"format not recognised (expected {utils.AUDIO_TYPES})" in str(load_error(garbage))


def test_audio_types_name_every_extension():
    for suffix in utils.AUDIO_EXTENSIONS:
        assert suffix[1:].upper() in utils.AUDIO_TYPES.upper()
