"""A tiny random Llama, built from nothing, byte-identical in every process.

Tests and demos need a real causal LM (real tokenizer, real KV cache, real batching
hazards) without downloading weights. This one is random, so its text is gibberish, but
everything about *how* it is run is exercised. Because the files are content-addressed
(workers/models/store.py), the bytes must be reproducible: the same build anywhere gives
the same model digest, so cached results stay valid across machines.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

ModelFiles = dict[str, bytes]

TINY_LLAMA_NAME = "tiny-llama"
VOCAB_SIZE = 512
MAX_POSITIONS = 512
PAD, BOS, EOS = "<pad>", "<s>", "</s>"

# Training text for the tokenizer's merges: plain English so prompts in tests and demos
# tokenize into a sensible number of pieces. Changing it changes the model digest.
CORPUS = """\
The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with a
single step. The weather today is mild and clear, with a light wind from the west and a
chance of rain in the evening. Data flows through the pipeline from one stage to the next,
and each stage reads its inputs, computes a result, and writes its output for the stages
that follow. Every record has a text field, a label, and an identifier. The model reads a
prompt and writes a completion, one token at a time, until it reaches the end of the text
or the limit on new tokens. Workers take tasks from a queue, run them in batches, and
report what they did. When a worker fails, another worker picks up the same task and
finishes it, and nothing is lost because every result is stored by its content. The cat
sat on the mat and watched the birds in the garden. Children played in the park while
their parents talked about the news, the prices of bread and milk, and the long summer
holidays. Science is the patient study of the world: we observe, we guess, we test our
guesses, and we keep the ones that survive. Music and stories carry what people remember
from one generation to the next. The library opens at nine in the morning and closes at
six in the evening; on Sundays it is closed. Please write a short summary of the article
in one sentence. Translate the following sentence into French. What is the capital of
France? Paris is the capital of France, and Berlin is the capital of Germany. Answer the
question using only the information in the passage. Count the words in this sentence.
Good morning, how are you today? I am fine, thank you, and you? The river runs to the sea,
the sea rises into clouds, and the clouds return as rain upon the hills. Numbers such as
one, two, three, ten, one hundred and one thousand appear in many texts. Simple tools,
used well, build great things.
"""


def _train_tokenizer() -> str:
    """Byte-level BPE trained on CORPUS; returns tokenizer.json text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=[PAD, BOS, EOS],  # ids 0, 1, 2
        # every byte is in the vocabulary, so any prompt (any language, emoji) encodes
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS.splitlines(), trainer=trainer)
    bos_id, eos_id = tok.token_to_id(BOS), tok.token_to_id(EOS)
    # Llama convention: every sequence starts with <s>. It also means an empty prompt
    # still gives the model one token to condition on.
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    assert (tok.token_to_id(PAD), bos_id, eos_id) == (0, 1, 2)
    text: str = tok.to_str()
    return text


def build_tiny_llama() -> ModelFiles:
    """Build the tiny model; returns file name -> bytes, loadable by
    AutoModelForCausalLM / AutoTokenizer.from_pretrained once written to a directory."""
    import torch
    from safetensors.torch import save as save_safetensors
    from tokenizers import Tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=Tokenizer.from_str(_train_tokenizer()),
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        padding_side="left",  # decoder-only batching: prompts end where generation starts
        model_max_length=MAX_POSITIONS,
    )
    config = LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=MAX_POSITIONS,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    # fork_rng: seed the init without disturbing the caller's global RNG stream
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
    # fp32 whatever torch's default dtype is; called via nn.Module because
    # PreTrainedModel's own .float/.eval stubs confuse mypy
    torch.nn.Module.eval(torch.nn.Module.float(model))
    config.architectures = ["LlamaForCausalLM"]  # what AutoModelForCausalLM dispatches on

    with tempfile.TemporaryDirectory(prefix="tiny-llama-") as tmp:
        config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        files = {p.name: p.read_bytes() for p in sorted(Path(tmp).iterdir()) if p.is_file()}
    # config.json records the transformers version that wrote it; dropped, so that the
    # model digest does not change with a library upgrade that changes nothing else
    config_dict = json.loads(files["config.json"])
    config_dict.pop("transformers_version", None)
    files["config.json"] = (json.dumps(config_dict, indent=2, sort_keys=True) + "\n").encode()
    # Weights written directly (not model.save_pretrained): same safetensors layout and
    # metadata, without the progress bar and generation_config.json (our executor runs
    # its own decoding loop). Sorted keys + fixed metadata -> stable bytes.
    state = {k: v.detach().contiguous() for k, v in sorted(model.state_dict().items())}
    files["model.safetensors"] = save_safetensors(state, metadata={"format": "pt"})
    return files
