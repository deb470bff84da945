"""Moving weights between this project, Hugging Face and EasyLM.

* `hf_mapping`: our parameter paths ↔ Hugging Face state-dict names and shapes.
* `families`: each Hugging Face family's config.json (LLaMA, Qwen2, Mistral) ↔ our config fields.
* `to_hf` / `from_hf`: the export and the import (`python -m easylm_align.convert_to_hf`,
  `python -m easylm_align.convert_from_hf` are their command lines).
* `easylm_checkpoint`: EasyLM's `streaming_params` files, as COMMIT's runs leave them.
* `output`: the staged output directory both converters write into.
"""

from easylm_align.errors import UserError


class ConversionError(UserError):
    """A problem with the user's input; the tools print it as one line and exit."""
