"""One file per architecture.  ARCHS maps `model.arch` to (config class, model class)."""

from bench.models.mdm import MDM, MDMConfig
from bench.models.dit import DiT, DiTConfig
from bench.models.vit import ViT, ViTConfig

ARCHS = {"vit": (ViTConfig, ViT), "mdm": (MDMConfig, MDM), "dit": (DiTConfig, DiT)}
from bench.models.llama import Llama, LlamaConfig  # noqa: E402  (autoregressive LM)
ARCHS["llama"] = (LlamaConfig, Llama)
from bench.models.recurrent import RecurrentConfig, RecurrentLM  # noqa: E402  (recurrent-depth LM)
ARCHS["recurrent"] = (RecurrentConfig, RecurrentLM)
from bench.models.rnn_lm import RNNLM, RNNLMConfig  # noqa: E402  (GRU/LSTM LM: the scoring model of another family)
ARCHS["rnn_lm"] = (RNNLMConfig, RNNLM)
from bench.models.noprop import NoProp, NoPropConfig  # noqa: E402  (NoProp-DT CNN: the paper's Table 6 comparison)
ARCHS["noprop"] = (NoPropConfig, NoProp)
