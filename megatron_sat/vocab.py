"""Megatron's vocabulary padding and the row rule for an extended SentencePiece vocabulary.

An extended tokenizer keeps every old piece at its id and appends new ones (what
``tools/extend_vocab.py`` writes). The embedding and output tables keep their old rows
bitwise, so old tokens' logits do not change; a new piece's row is the mean of the old rows
of the pieces the *old* tokenizer splits its text into (:func:`new_row_sources`), and the
table is padded with zero rows to megatron's size (:func:`padded_vocab_size`).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch

from megatron_sat.megatron_checkpoint import ConversionError


def padded_vocab_size(vocab_size: int, divisible_by: int, tp: int) -> int:
    """Megatron's padded vocabulary: the next multiple of ``divisible_by * tp``."""
    multiple = divisible_by * tp
    return math.ceil(vocab_size / multiple) * multiple


def pad_rows(table: torch.Tensor, rows: int) -> torch.Tensor:
    """Append zero rows up to ``rows``: megatron's padding entries (never an input token;
    logit 0)."""
    return torch.cat([table, table.new_zeros(rows - table.shape[0], table.shape[1])])


def load_sentencepiece(path: str | os.PathLike, flag: str):
    """A ``SentencePieceProcessor``; a missing or unreadable file is a ConversionError
    naming ``flag``."""
    import sentencepiece

    if not Path(path).is_file():
        raise ConversionError(f"{flag} {path}: file not found (a SentencePiece tokenizer.model)")
    try:
        return sentencepiece.SentencePieceProcessor(model_file=str(path))
    except (RuntimeError, OSError) as error:
        raise ConversionError(f"{flag} {path}: not a SentencePiece model ({error})") from error


def check_extension(old, new) -> None:
    """Fail unless the ``new`` tokenizer keeps every piece of ``old`` at its id."""
    old_size, new_size = old.get_piece_size(), new.get_piece_size()
    if new_size < old_size:
        raise ConversionError(f"--new-tokenizer-model has {new_size} pieces, fewer than the "
                              f"{old_size} of --old-tokenizer-model; pass the extended "
                              "tokenizer as --new-tokenizer-model")
    for i in range(old_size):
        if old.id_to_piece(i) != new.id_to_piece(i):
            raise ConversionError(
                f"--new-tokenizer-model does not extend --old-tokenizer-model: id {i} is "
                f"{new.id_to_piece(i)!r} in the new tokenizer but {old.id_to_piece(i)!r} in "
                "the old one; an extension keeps every old piece at its id and appends")


def new_row_sources(old, new) -> list[list[int]]:
    """For each piece ``new`` appends to ``old``: the old ids whose rows it averages.

    The piece's text ("▁" read as a space) is split by the old tokenizer as it would be
    inside a line (no dummy "▁" prefix); old unknown-token ids are dropped. An empty list
    (control, unknown or byte pieces, or text the old tokenizer only knows as unknown)
    stands for the mean of all old rows.
    """
    import sentencepiece
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(old.serialized_model_proto())
    proto.normalizer_spec.add_dummy_prefix = False
    splitter = sentencepiece.SentencePieceProcessor(model_proto=proto.SerializeToString())
    sources = []
    for i in range(old.get_piece_size(), new.get_piece_size()):
        if new.is_unknown(i) or new.is_control(i) or new.is_byte(i):
            sources.append([])
            continue
        text = new.id_to_piece(i).replace("\u2581", " ")
        sources.append([j for j in splitter.encode(text) if not old.is_unknown(j)])
    return sources


def extend_rows(table: torch.Tensor, old_size: int, sources: list[list[int]],
                rows: int) -> torch.Tensor:
    """``table``'s first ``old_size`` rows unchanged, one new row per entry of ``sources``
    (the mean of those old rows, or of all old rows), zero rows up to ``rows`` (so with no
    ``sources``: megatron's padding of the old vocabulary). Means are taken in float32 and
    rounded once to the table's dtype."""
    old = table[:old_size]
    old32 = old.float()
    every = old32.mean(dim=0)
    new = [old32[ids].mean(dim=0) if ids else every for ids in sources]
    return pad_rows(torch.cat([old, *(row.to(table.dtype)[None] for row in new)]), rows)


EMBEDDING = "embedding.word_embeddings.weight"


def check_tokenizer_fits_checkpoint(load_dir, tokenizer_model, divisible_by: int,
                                    tp: int) -> None:
    """Before training resumes from ``--load``: the tokenizer's padded vocabulary must be
    the checkpoint's number of embedding rows (megatron would otherwise fail deep inside
    the checkpoint loader with a shape mismatch). A root without a checkpoint (a fresh
    run) or in another format than torch_dist is left to megatron."""
    import torch.distributed.checkpoint as dcp

    from megatron_sat.megatron_checkpoint import MegatronCheckpoint

    try:
        directory = MegatronCheckpoint.locate(load_dir, flag="--load")
    except ConversionError:
        return
    meta = dcp.FileSystemReader(str(directory)).read_metadata()
    stored = meta.state_dict_metadata.get(EMBEDDING)
    if stored is None:  # a later pipeline stage only, or not a GPT checkpoint
        return
    rows = stored.size[0]
    pieces = load_sentencepiece(tokenizer_model, "--tokenizer-model").get_piece_size()
    padded = padded_vocab_size(pieces, divisible_by, tp)
    if padded != rows:
        raise ConversionError(
            f"--tokenizer-model {tokenizer_model} has {pieces} pieces, {padded} rows after "
            f"padding to --make-vocab-size-divisible-by {divisible_by} x "
            f"--tensor-model-parallel-size {tp}, but the checkpoint in --load {load_dir} has "
            f"{rows} embedding rows. Use the tokenizer the checkpoint was trained with, or "
            "resize the checkpoint for this tokenizer: tools/convert_checkpoint.py resize")
