"""fairseq's HuBERT parameter names (which S3PRL's HubertModel and DistillerModel keep) mapped to ours (torchaudio's
HuBERTPretrainModel): the S3PRL export and the student's start from its teacher both rely on it."""

from __future__ import annotations

import re

from torchaudio.models.wav2vec2.utils.import_fairseq import _map_key


def torchaudio_key(fairseq_key: str) -> str:
    """Our parameter name for a fairseq HubertModel parameter name; KeyError for one we do not have."""
    if fairseq_key == "mask_emb":
        return "mask_generator.mask_embedding"
    match = re.fullmatch(r"final_proj\.(weight|bias)", fairseq_key)
    if match:
        return f"logit_generator.final_proj.{match[1]}"
    match = re.fullmatch(r"encoder\.pos_conv\.0\.weight_(g|v)", fairseq_key)
    if match:  # torchaudio keeps weight norm as a parametrization: original0 = g, original1 = v
        return (
            f"wav2vec2.encoder.transformer.pos_conv_embed.conv.parametrizations.weight.original{'01'[match[1] == 'v']}"
        )
    mapped = _map_key(fairseq_key)
    if mapped is None:
        raise KeyError(fairseq_key)
    return f"wav2vec2.{mapped}"
