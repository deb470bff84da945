"""Text processors: one example (a dict) → tokens and a loss mask.

`PROCESSORS` names them; `--train_dataset.text_processor.type` picks one (left empty,
`alpaca=True` picks `alpaca` and otherwise `fields`, as EasyLM's flags do). A new processor is a
new subclass added to `PROCESSORS`; the train loop never changes.

Every processor can code-mix its text with a MUSE dictionary (COMMIT): `codemix_dict_path`,
`codemix_ratio`. What gets mixed is the processor's business (the Alpaca processor keeps its
template intact when `block_codemix_in_template=True`). Randomness is seeded by
(`codemix_seed`, example index), so a resumed run produces the same examples.

Special tokens and loss masks. By default an example is one BOS (no loss), its tokens, and one
EOS (a target), as `--tokenizer.add_bos_token` / `add_eos_token` say; an Alpaca example trains
every token after the prompt, the response's first token included. COMMIT's EasyLM code
(thnkinbtfly/COMMIT `EasyLM/data.py`) differs in two places, which `reference_token_stream=True`
reproduces for bit-for-bit replication:

* `fields` rows are `<s><s> text </s></s>`: the processor adds its own BOS/EOS and its Hugging
  Face tokenizer adds BOS/EOS again on every call (the tokenizer flags), so the second `<s>` and
  both `</s>` are targets. Here the processor's own pair is always on (COMMIT's defaults) and the
  inner pair follows the tokenizer flags.
* The Alpaca mask leaves the response's first token untrained: its prompt length is
  `len(tokenizer(prompt))`, which counts the BOS and the EOS the tokenizer adds to the prompt alone.

Everything else is the same in both modes: Alpaca prompt and output are tokenized as one string
(`tokenizer(prompt + output)`, the reference's tokens at the seam) with the reference's template
strings (`alpaca_templates`), and the prompt's share of the tokens is the token count of the prompt
tokenized alone.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

from ml_collections import ConfigDict

from easylm_align.alpaca_templates import get_alpaca_template
from easylm_align.codemix import CodeMixer, CoverageCheck, MixStats
from easylm_align.errors import ConfigError, UserError
from easylm_align.tokenizer import Tokenizer


class ProcessorError(UserError):
    """A problem with one example; the dataset adds the file and line."""


class Processed(NamedTuple):
    tokens: list[int]
    loss_mask: list[float]
    stats: MixStats


class Segment(NamedTuple):
    """A piece of text tokenized on its own (or one special token); `loss`: train on it."""
    text: str
    loss: bool
    token_id: Optional[int] = None


def default_config() -> ConfigDict:
    return ConfigDict(dict(
        type="",
        fields="text",
        subfield_separator=" ",
        alpaca=False,
        alpaca_lang="en",
        codemix_dict_path="",
        codemix_ratio=0.0,
        codemix_seed=0,
        # Stop when fewer than this share of the data's first 1,000 words are in the dictionary
        # (a dictionary in the wrong direction finds none); 0 turns the check off. codemix.CoverageCheck.
        codemix_min_coverage=0.01,
        # True: mix only instruction, input and output, never the Alpaca template (the paper's
        # COMMIT); False (EasyLM/COMMIT's default): mix the whole prompt, template included.
        block_codemix_in_template=False,
        # Code-mixing improvements over the reference's word rule (off = the reference's);
        # easylm_align/codemix.py. True: a word missing from the dictionary is also looked up
        # in lowercase ("The" -> "the").
        codemix_lowercase_fallback=False,
        # True: words are separated by any whitespace run, kept exactly (the reference splits
        # on ' ' only, so a word glued to a newline is never looked up).
        codemix_whitespace_split=False,
        # True: COMMIT's exact token stream (doubled BOS/EOS in `fields` rows, the Alpaca
        # response's first token untrained), for bit-for-bit replication; module docstring.
        reference_token_stream=False,
    ))


def build(config: ConfigDict, tokenizer: Tokenizer) -> "TextProcessor":
    name = config.type or ("alpaca" if config.alpaca else "fields")
    if name not in PROCESSORS:
        raise ConfigError(f"--*.text_processor.type={name!r}: choose one of {sorted(PROCESSORS)}")
    return PROCESSORS[name](config, tokenizer)


class TextProcessor:

    def __init__(self, config: ConfigDict, tokenizer: Tokenizer):
        self.config = config
        self.tokenizer = tokenizer
        if not 0.0 <= config.codemix_ratio <= 1.0:
            raise ConfigError(f"--*.text_processor.codemix_ratio={config.codemix_ratio}: must be in [0, 1]")
        self.mixer = None
        if config.codemix_dict_path:
            self.mixer = CodeMixer.from_file(
                config.codemix_dict_path, config.codemix_ratio, config.codemix_seed,
                lowercase_fallback=config.codemix_lowercase_fallback,
                whitespace_split=config.codemix_whitespace_split)
            self.coverage = CoverageCheck(config.codemix_dict_path, config.codemix_min_coverage)

    def segments(self, example: dict, index: int) -> tuple[list[Segment], MixStats]:
        """The processor's own logic: the example as text segments (code-mixing done where wanted)."""
        raise NotImplementedError

    def __call__(self, example: dict, index: int) -> Processed:
        segments, stats = self.segments(example, index)
        tokens, mask = self.encode_segments(segments)
        return Processed(tokens, mask, stats)

    def encode_segments(self, segments: Sequence[Segment]) -> tuple[list[int], list[float]]:
        """Each text segment tokenized on its own, under its mask, between BOS (no loss) and EOS.

        With `reference_token_stream` (COMMIT's `TextProcessor.default`): the outer BOS/EOS are
        always there and each text segment also gets the tokenizer flags' BOS/EOS, under its mask.
        """
        tok, reference = self.tokenizer, self.config.reference_token_stream
        inner_bos = [tok.bos_id] if reference and tok.add_bos_token else []
        inner_eos = [tok.eos_id] if reference and tok.add_eos_token else []
        encoded = iter(tok.encode_batch([s.text for s in segments if s.token_id is None]))
        tokens, mask = [], []
        if reference or tok.add_bos_token:
            tokens.append(tok.bos_id)
            mask.append(0.0)
        for seg in segments:
            ids = [seg.token_id] if seg.token_id is not None else inner_bos + next(encoded) + inner_eos
            tokens += ids
            mask += [1.0 if seg.loss else 0.0] * len(ids)
        if reference or tok.add_eos_token:
            tokens.append(tok.eos_id)
            mask.append(1.0)
        return tokens, mask

    def mix(self, texts: Sequence[str], index: int) -> tuple[list[str], MixStats]:
        if self.mixer is None:
            return list(texts), MixStats(0, 0, 0)
        mixed, stats = self.mixer.mix_fields(texts, index)
        self.coverage.add(stats)
        return mixed, stats


def get_field(example: dict, name: str, required: bool = True) -> str:
    """A text field: a string, or null for an empty one; a number, list or object is an error."""
    if name not in example and required:
        raise ProcessorError(f"example has no field {name!r} (it has {sorted(example)})")
    value = example.get(name)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ProcessorError(f"field {name!r} must be a string, got {type(value).__name__} {_preview(value)}")
    return value


def _preview(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


class FieldsProcessor(TextProcessor):
    """EasyLM's `fields` syntax: `[prompt],answer` (brackets: no loss), `a+b` joins fields with
    `subfield_separator`, and `<|bos|>` / `<|eos|>` insert the special tokens. With a code-mix
    dictionary this is COMMIT's code-mixed continual causal LM (`fields=text`)."""

    SPECIAL = {"<|bos|>": "bos_id", "<|eos|>": "eos_id"}

    def __init__(self, config: ConfigDict, tokenizer: Tokenizer):
        super().__init__(config, tokenizer)
        self.spec = []  # (names or special, loss)
        for item in config.fields.split(","):
            item = item.strip()
            loss = not (item.startswith("[") and item.endswith("]"))
            item = item.strip("[]")
            if not item:
                raise ConfigError(f"--*.text_processor.fields={config.fields!r}: empty field name")
            self.spec.append((item.split("+"), loss))

    def segments(self, example: dict, index: int) -> tuple[list[Segment], MixStats]:
        texts = [self.config.subfield_separator.join(get_field(example, n) for n in names)
                 for names, _ in self.spec if names[0] not in self.SPECIAL]
        mixed, stats = self.mix(texts, index)
        mixed = iter(mixed)
        segments = []
        for names, loss in self.spec:
            if names[0] in self.SPECIAL:
                segments.append(Segment("", loss, getattr(self.tokenizer, self.SPECIAL[names[0]])))
            else:
                segments.append(Segment(next(mixed), loss))
        return segments, stats


class AlpacaProcessor(TextProcessor):
    """Stanford Alpaca prompts: `BOS prompt+output EOS`, loss on the response and EOS only.

    Prompt and output are tokenized as one string, as COMMIT does; BOS and as many positions as
    the prompt alone has tokens are untrained. Unlike COMMIT's code, the response's first token is
    trained (theirs also counts the prompt's own EOS: `reference_token_stream=True` restores that).
    With a code-mix dictionary: `block_codemix_in_template=True` mixes instruction, input and
    output and never the template; False mixes the whole prompt, template included (the paper's
    "naive code-mix").
    """

    def __init__(self, config: ConfigDict, tokenizer: Tokenizer):
        super().__init__(config, tokenizer)
        self.template = get_alpaca_template(config.alpaca_lang)

    def __call__(self, example: dict, index: int) -> Processed:
        prompt, output, stats = self.prompt_and_output(example, index)
        tok = self.tokenizer
        bos = [tok.bos_id] if tok.add_bos_token else []
        eos = [tok.eos_id] if tok.add_eos_token else []
        ids, prompt_ids = tok.encode_batch([prompt + output, prompt])
        untrained = len(bos) + len(prompt_ids)
        if self.config.reference_token_stream:
            untrained += len(eos)  # COMMIT's length of tokenizer(prompt) includes that call's EOS
        tokens = bos + ids + eos
        untrained = min(untrained, len(tokens))
        return Processed(tokens, [0.0] * untrained + [1.0] * (len(tokens) - untrained), stats)

    def prompt_and_output(self, example: dict, index: int) -> tuple[str, str, MixStats]:
        """The formatted prompt and the output, code-mixed as configured."""
        # Missing keys are errors; an empty output is not (Alpaca has 28: only EOS is trained).
        instruction, inp, output = (get_field(example, "instruction"),
                                    get_field(example, "input", required=False), get_field(example, "output"))
        if self.config.block_codemix_in_template:
            (instruction, inp, output), stats = self.mix([instruction, inp, output], index)
            prompt = self.format_prompt(instruction, inp)
        else:
            (prompt, output), stats = self.mix([self.format_prompt(instruction, inp), output], index)
        return prompt, output, stats

    def format_prompt(self, instruction: str, inp: str) -> str:
        template = self.template.with_input if inp else self.template.without_input  # COMMIT's test
        return template.format(instruction=instruction, input=inp)


PROCESSORS: dict[str, type[TextProcessor]] = {"fields": FieldsProcessor, "alpaca": AlpacaProcessor}
