"""Corpus layouts under --audio_path, read as Utterance records: the plain speaker tree, Common
Voice and Speech Commands; find_corpus tells which one a folder holds."""

from __future__ import annotations

import csv
import dataclasses
import functools
import hashlib
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import utils

CV_TSV = "validated.tsv"  # Common Voice's list of validated clips, one per language
SPEAKER_NAME_LENGTH = 16  # characters of a client_id kept as the speaker name
BACKGROUND_NOISE = "_background_noise_"  # Speech Commands' noise recordings
SILENCE = "_silence_"  # Speech Commands' test set: noise cut into clips, no speaker
UNKNOWN = "_unknown_"  # Speech Commands' test set: other words, as <word>_<speaker>_nohash_<n>
# The contributor id and take; the test set's _unknown_ clips end in .wav.wav.
KEYWORD_CLIP = re.compile(r"(?P<speaker>[0-9A-Za-z]+)_nohash_(?P<take>\d+)(?:\.wav)?")
UNKNOWN_CLIP = re.compile(r"(?P<word>[A-Za-z]+)_" + KEYWORD_CLIP.pattern)
MISNAMED = "misnamed"  # the kind of a Speech Commands file whose name gives no speaker


@dataclass(frozen=True)
class Utterance:
    """One recording: its speaker, its name in the corpus, its path relative to the corpus root
    ('/'-separated) and its transcript ('' when unknown)."""

    speaker: str
    utterance: str
    path: str
    text: str = ""


@dataclass(frozen=True)
class Corpus:
    """The utterances found under --audio_path, and what the layout's reader knows of them."""

    layout: str  # "tree", "commonvoice" or "speechcommands"
    utterances: tuple[Utterance, ...]
    skipped: list[dict]  # files or TSV lines that belong to no speaker, with their reason
    languages: dict[str, str] = dataclasses.field(default_factory=dict)  # path -> language (CV)
    rows: dict[str, str] = dataclasses.field(default_factory=dict)  # path -> '<tsv>:<line>' (CV)
    noise: str = ""  # a folder of noise recordings that came with the corpus, or ''

    @functools.cached_property
    def tree(self) -> dict[str, list[str]]:
        """speaker -> sorted paths, speakers sorted."""
        tree: dict[str, list[str]] = {}
        for utterance in self.utterances:
            tree.setdefault(utterance.speaker, []).append(utterance.path)
        return {speaker: sorted(paths) for speaker, paths in sorted(tree.items())}

    @functools.cached_property
    def texts(self) -> dict[str, str]:
        """path -> transcript, of the utterances that have one."""
        return {u.path: u.text for u in self.utterances if u.text}


def find_corpus(root: str | Path) -> Corpus:
    """Common Voice (ROOT/<lang>/validated.tsv, or one release folder ROOT/validated.tsv with
    ROOT/clips/) when its TSVs are there, else Speech Commands (word folders of
    <speaker>_nohash_<n> clips) when most clips are so named, else the <speaker>/**/<utt> tree.
    Transcripts the layout lacks come from ROOT/manifest.csv, if there is one."""
    root = Path(root)
    folders = sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    if (root / CV_TSV).is_file() and (root / "clips").is_dir():
        corpus = read_commonvoice(root, [(root, "", root.resolve().name)])
    elif any((folder / CV_TSV).is_file() for folder in folders):
        corpus = read_commonvoice(root, [(folder, folder.name + "/", folder.name)
                                         for folder in folders])
    else:
        corpus = read_speechcommands(root, folders)
        if len(corpus.utterances) <= len(corpus.skipped):  # not Speech Commands' file names
            corpus = Corpus("tree", tuple(tree_utterances(find_utterances(root))), [])
    transcripts = read_transcripts(root)
    if not transcripts:
        return corpus
    return dataclasses.replace(corpus, utterances=tuple(
        u if u.text else dataclasses.replace(u, text=transcripts.get(u.path, ""))
        for u in corpus.utterances))


def find_utterances(root: str | Path) -> dict[str, list[str]]:
    """speaker -> sorted audio paths relative to root; the speaker is the first folder level.
    Symlinked folders are followed (corpus subsets are often built from links), each once."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"--audio_path {root}: not a folder")
    tree: dict[str, list[str]] = {}
    seen = set()
    # Plain strings, not Path objects: at VoxCeleb2's million files pathlib costs a minute.
    for folder, subfolders, names in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:  # a link loop, or two links to one folder
            subfolders.clear()
            continue
        seen.add(real)
        relative = os.path.relpath(folder, root)
        if relative == os.curdir:
            continue
        speaker = relative.split(os.sep, 1)[0]
        prefix = relative.replace(os.sep, "/") + "/"
        for name in names:
            if (os.path.splitext(name)[1].lower() in utils.AUDIO_EXTENSIONS
                    and os.path.isfile(os.path.join(folder, name))):
                tree.setdefault(speaker, []).append(prefix + name)
    if not tree:
        raise FileNotFoundError(f"--audio_path {root}: no <speaker>/**/<file> audio files "
                                f"({', '.join(utils.AUDIO_EXTENSIONS)}), no Common Voice "
                                f"<lang>/{CV_TSV} and no Speech Commands "
                                f"<word>/<speaker>_nohash_<n> clips")
    return {speaker: sorted(paths) for speaker, paths in sorted(tree.items())}


def tree_utterances(tree: dict[str, list[str]]) -> Iterator[Utterance]:
    """The records of a find_utterances tree; an utterance is named by its path less extension."""
    for speaker, paths in tree.items():
        for path in paths:
            yield Utterance(speaker, os.path.splitext(path)[0], path)


def read_commonvoice(root: Path, languages: list[tuple[Path, str, str]]) -> Corpus:
    """Speakers (client_id) and clips of each (folder, path prefix, language)'s validated.tsv;
    a malformed line is skipped with its file and line number, a language without a TSV too."""
    clips: dict[str, list[str]] = {}  # client_id -> paths
    languages_of, rows, skipped = {}, {}, []
    for folder, prefix, language in languages:
        tsv = f"{prefix}{CV_TSV}"
        if not (folder / CV_TSV).is_file():
            skipped.append({"path": prefix.rstrip("/"), "kind": "malformed",
                            "reason": f"{prefix}: a language folder without {CV_TSV}"})
            continue
        for line, client_id, clip, problem in _tsv_rows(folder / CV_TSV):
            path = f"{prefix}clips/{clip}"
            if problem is None and path in rows:
                problem = f"clip already listed on {rows[path]}"
            if problem is not None:
                skipped.append({"path": f"{tsv}:{line}", "kind": "malformed",
                                "reason": f"{tsv} line {line}: {problem}"})
                continue
            clips.setdefault(client_id, []).append(path)
            languages_of[path] = language
            rows[path] = f"{tsv}:{line}"
    if not clips:
        raise FileNotFoundError(f"--audio_path {root}: no usable row in its Common Voice "
                                f"{CV_TSV} files")
    names = speaker_names(list(clips))
    utterances = tuple(Utterance(names[client], os.path.splitext(path.rsplit("/", 1)[1])[0], path)
                       for client, paths in clips.items() for path in paths)
    return Corpus("commonvoice", utterances, skipped, languages_of, rows)


def _tsv_rows(tsv: Path) -> Iterator[tuple[int, str, str, str | None]]:
    """(line number, client_id, clip file name, problem or None) of each row after the header.
    Parsed line by line (CRLF or LF), so a stray quote spoils its own line only."""
    lines = tsv.read_bytes().splitlines()
    header = next(csv.reader([lines[0].decode("utf-8-sig", "replace")], delimiter="\t")) \
        if lines else []
    if "client_id" not in header or "path" not in header:
        yield 1, "", "", f"the header {header[:3]}... lacks the client_id and path columns"
        return
    id_column, path_column = header.index("client_id"), header.index("path")
    for number, raw in enumerate(lines[1:], 2):
        if not raw.strip():
            continue
        try:
            fields = next(csv.reader([raw.decode("utf-8")], delimiter="\t", strict=True))
        except UnicodeDecodeError:
            yield number, "", "", "not UTF-8 text"
            continue
        except csv.Error as error:
            yield number, "", "", f"unbalanced CSV quoting ({error})"
            continue
        if len(fields) != len(header):
            yield number, "", "", (f"{len(fields)} tab-separated columns, expected "
                                   f"{len(header)} as in the header")
            continue
        client_id, clip = fields[id_column].strip(), fields[path_column].strip()
        if not client_id:
            yield number, "", "", "empty client_id"
        elif not clip or clip in (".", "..") or "/" in clip or "\\" in clip:
            yield number, "", "", f"path {clip!r} is not a file name in clips/"
        else:
            yield number, client_id, clip, None


def speaker_names(client_ids: list[str]) -> dict[str, str]:
    """client_id -> a short, safe file name: its first 16 characters (client_ids are hex),
    longer until no two collide; a client_id with other characters goes by its SHA-1."""
    safe = {c: c if re.fullmatch(r"[0-9A-Za-z]+", c) else hashlib.sha1(c.encode()).hexdigest()
            for c in client_ids}
    longest = max(len(name) for name in safe.values())
    for length in range(min(SPEAKER_NAME_LENGTH, longest), longest + 1):
        names = {c: name[:length] for c, name in safe.items()}
        if len(set(names.values())) == len(names):
            return names
    raise ValueError("two Common Voice client_ids give one speaker name")


def read_speechcommands(root: Path, folders: list[Path]) -> Corpus:
    """Speech Commands as it unpacks: <word>/<speaker>_nohash_<n>.<ext> (the test set's
    _unknown_/<word>_<speaker>_nohash_<n>.wav.wav too); the text is the word. _silence_ is no
    speech; _background_noise_ becomes the corpus's noise. A clip named otherwise is skipped."""
    utterances, skipped = [], []
    for folder in folders:
        if folder.name in (SILENCE, BACKGROUND_NOISE):
            continue
        try:
            with os.scandir(folder) as entries:
                names = sorted(e.name for e in entries if e.is_file() and os.path.splitext(
                    e.name)[1].lower() in utils.AUDIO_EXTENSIONS)
        except OSError:  # unlistable, as os.walk takes it in the plain tree: no clips
            continue
        for name in names:
            path = f"{folder.name}/{name}"
            stem = os.path.splitext(name)[0]
            found = (UNKNOWN_CLIP if folder.name == UNKNOWN else KEYWORD_CLIP).fullmatch(stem)
            if found is None:
                expected = "<word>_" * (folder.name == UNKNOWN) + "<speaker>_nohash_<n>.<ext>"
                skipped.append({"path": path, "kind": MISNAMED,
                                "reason": f"file name {name!r} is not {expected}, so it names "
                                          f"no Speech Commands speaker"})
                continue
            word = found["word"] if folder.name == UNKNOWN else folder.name
            utterances.append(Utterance(found["speaker"], f"{folder.name}/{stem}", path, word))
    noise = root / BACKGROUND_NOISE
    return Corpus("speechcommands", tuple(utterances), skipped,
                  noise=str(noise) if noise.is_dir() else "")


def read_transcripts(root: str | Path) -> dict[str, str]:
    """path -> transcript from <root>/manifest.csv (columns path and text_if_known or text)."""
    manifest = Path(root) / "manifest.csv"
    if not manifest.exists():
        return {}
    try:
        with open(manifest, newline="", encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle))
    except (UnicodeDecodeError, csv.Error) as error:
        raise ValueError(f"{manifest}: not a UTF-8 CSV file ({error})") from None
    column = next((c for c in ("text_if_known", "text", "transcript") if rows and c in rows[0]),
                  None)
    if column is None or "path" not in rows[0]:
        return {}
    return {row["path"]: (row[column] or "").strip() for row in rows}
