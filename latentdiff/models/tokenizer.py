"""BERT uncased WordPiece tokenizer, read from a local `vocab.txt` (no download, no transformers).

It reproduces Hugging Face's `BertTokenizerFast` (what CompVis' BERTEmbedder uses) with
`padding='max_length', truncation=True`: special tokens in the raw text are kept whole; the rest is
cleaned (control chars dropped, whitespace unified), CJK ideographs isolated, accents stripped (NFD),
lower-cased, split on whitespace and punctuation, then WordPiece'd greedily (longest match first,
`##` continuations, words over 100 chars are [UNK]). Output: [CLS] ... [SEP] [PAD]... .
Character classes come from Python's `unicodedata`; tokenizers uses older Unicode tables, so a few
hundred rare code points (marks and punctuation added since Unicode ~9) may split differently.
"""
import json
import os
import re
import unicodedata
import warnings

import numpy as np

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
MAX_CHARS_PER_WORD = 100

# BertNormalizer's "Chinese character" blocks (its list has 0x2B920, not 0x2B820, for Ext. E).
_CJK_RANGES = ((0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF), (0x2A700, 0x2B73F),
               (0x2B740, 0x2B81F), (0x2B920, 0x2CEAF), (0xF900, 0xFAFF), (0x2F800, 0x2FA1F))


def _is_cjk(cp):
    return any(lo <= cp <= hi for lo, hi in _CJK_RANGES)


def _is_control(c):
    # Cc, Cf and Co (tokenizers' `is_other`); unassigned code points (Cn) are kept.
    return c not in "\t\n\r" and unicodedata.category(c) in ("Cc", "Cf", "Co")


def _is_punctuation(c):
    cp = ord(c)
    if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126:
        return True
    return unicodedata.category(c).startswith("P")


def normalize(text):
    """Clean, isolate CJK ideographs, strip accents, lower-case (in BertNormalizer's order)."""
    out = []
    for c in text:
        cp = ord(c)
        if cp == 0 or cp == 0xFFFD or _is_control(c):
            continue
        if c.isspace():
            out.append(" ")
        elif _is_cjk(cp):
            out.extend((" ", c, " "))
        else:
            out.append(c)
    text = unicodedata.normalize("NFD", "".join(out))
    return "".join(c.lower() for c in text if unicodedata.category(c) != "Mn")


def split_words(text):
    """Split normalized text on whitespace and make every punctuation char a word of its own."""
    words = []
    for chunk in text.split():
        start = 0
        for i, c in enumerate(chunk):
            if _is_punctuation(c):
                if i > start:
                    words.append(chunk[start:i])
                words.append(c)
                start = i + 1
        if start < len(chunk):
            words.append(chunk[start:])
    return words


def _read_tokenizer_json(path):
    """The vocabulary of a Hugging Face `tokenizer.json`, checked to be BERT uncased WordPiece."""
    with open(path, encoding="utf-8") as f:
        spec = json.load(f)
    model, norm = spec.get("model") or {}, spec.get("normalizer") or {}
    ok = (model.get("type") == "WordPiece" and model.get("continuing_subword_prefix", "##") == "##"
          and model.get("max_input_chars_per_word", MAX_CHARS_PER_WORD) == MAX_CHARS_PER_WORD
          and norm.get("type") == "BertNormalizer" and norm.get("lowercase", True)
          and norm.get("clean_text", True) and norm.get("handle_chinese_chars", True)
          and norm.get("strip_accents") in (None, True))
    if not ok:
        raise ValueError(f"{path} is not a BERT uncased WordPiece tokenizer (model {model.get('type')}, "
                         f"normalizer {norm}); the text encoder needs one")
    return dict(model["vocab"])


class BertTokenizer:
    """WordPiece tokenizer over a BERT `vocab.txt` (one token a line, id = line number), or over the
    `tokenizer.json` that transformers >= 5 saves instead (a BERT-uncased WordPiece model)."""

    def __init__(self, vocab_file, max_length=77):
        if not os.path.isfile(vocab_file):
            raise FileNotFoundError(
                f"tokenizer vocabulary not found: {vocab_file}. The text encoder needs a BERT "
                "WordPiece vocab.txt (bert-base-uncased's, 30522 tokens, as CompVis and diffusers use; "
                "it is the `tokenizer/vocab.txt` of a diffusers LDM text-to-image folder)")
        self.vocab_file = vocab_file
        if vocab_file.endswith(".json"):
            self.vocab = _read_tokenizer_json(vocab_file)
        else:
            with open(vocab_file, encoding="utf-8") as f:
                self.vocab = {line.rstrip("\n"): i for i, line in enumerate(f)}
        missing = [t for t in ("[PAD]", "[UNK]", "[CLS]", "[SEP]") if t not in self.vocab]
        if missing:
            raise ValueError(f"{vocab_file} is not a BERT vocabulary: it lacks {', '.join(missing)}")
        self.max_length = max_length
        self.pad_id, self.unk_id = self.vocab["[PAD]"], self.vocab["[UNK]"]
        self.cls_id, self.sep_id = self.vocab["[CLS]"], self.vocab["[SEP]"]
        specials = [t for t in SPECIAL_TOKENS if t in self.vocab]
        self._special_re = re.compile("(" + "|".join(map(re.escape, specials)) + ")")

    @classmethod
    def from_pretrained(cls, folder, **kwargs):
        """Read `folder/vocab.txt`, or else `folder/tokenizer.json` (the `tokenizer` folder of a
        diffusers pipeline, saved by transformers 4 or 5)."""
        for name in ("vocab.txt", "tokenizer.json"):
            if os.path.isfile(os.path.join(folder, name)):
                return cls(os.path.join(folder, name), **kwargs)
        return cls(os.path.join(folder, "vocab.txt"), **kwargs)  # raises, saying what is needed

    def save_vocab(self, path):
        """Write the vocabulary as a BERT `vocab.txt` (one token a line, in id order)."""
        by_id = sorted(self.vocab.items(), key=lambda kv: kv[1])
        if [i for _, i in by_id] != list(range(len(by_id))):
            raise ValueError("the vocabulary's ids are not 0..n-1; it cannot be written as vocab.txt")
        with open(path, "w", encoding="utf-8") as f:
            f.writelines(t + "\n" for t, _ in by_id)

    @property
    def vocab_size(self):
        return len(self.vocab)

    def wordpiece(self, word):
        """Greedy longest-match-first split of one word into ids; [UNK] if any part has no match."""
        if len(word) > MAX_CHARS_PER_WORD:
            return [self.unk_id]
        ids, start = [], 0
        while start < len(word):
            for end in range(len(word), start, -1):
                piece = word[start:end] if start == 0 else "##" + word[start:end]
                if piece in self.vocab:
                    ids.append(self.vocab[piece])
                    start = end
                    break
            else:
                return [self.unk_id]
        return ids

    def _words(self, text):
        """(word, ids) pairs of one text; special tokens written in the text stay whole."""
        for i, part in enumerate(self._special_re.split(text)):
            if i % 2:
                yield part, [self.vocab[part]]
            else:
                for word in split_words(normalize(part)):
                    yield word, self.wordpiece(word)

    def tokenize(self, text):
        """The token ids of `text`, without [CLS]/[SEP] or padding."""
        return [t for _, ids in self._words(text) for t in ids]

    def unknown_words(self, text):
        """The (normalized) words of `text` that the vocabulary cannot spell, i.e. map to [UNK]."""
        out = []
        for word, ids in self._words(text):
            if ids == [self.unk_id] and word != "[UNK]" and word not in out:
                out.append(word)
        return out

    def encode(self, texts, max_length=None):
        """Texts -> int32 ids (B, max_length): [CLS] tokens [SEP] [PAD]...; long texts are truncated
        (keeping [SEP] last) with a warning."""
        if isinstance(texts, str):
            texts = [texts]
        max_length = self.max_length if max_length is None else max_length
        if max_length < 2:
            raise ValueError(f"max_length must be at least 2 ([CLS] and [SEP]), got {max_length}")
        out = np.full((len(texts), max_length), self.pad_id, np.int32)
        for b, text in enumerate(texts):
            ids = self.tokenize(text)
            keep = max_length - 2
            if len(ids) > keep:
                short = text if len(text) <= 60 else text[:57] + "..."
                warnings.warn(f"prompt {b} ({short!r}) is {len(ids) + 2} tokens long; truncated to "
                              f"{max_length}, dropping its last {len(ids) - keep} tokens", stacklevel=2)
                ids = ids[:keep]
            row = [self.cls_id, *ids, self.sep_id]
            out[b, :len(row)] = row
        return out

    __call__ = encode
