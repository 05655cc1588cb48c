"""A toy engine for a fifth parallelType (tests/test_parallel_types.py): the model whole on one device, in one
process, through transformers' own from_pretrained."""
from ts_plugin.engines import HFStepModel, LoadContext

LOADED = []  # the contexts it was given, for the test to look at


def load(context: LoadContext) -> HFStepModel:
    from transformers import AutoModelForCausalLM

    LOADED.append(context)
    model = AutoModelForCausalLM.from_pretrained(str(context.model_path), dtype=context.dtype)
    return HFStepModel(model.to(context.device).eval(), context.device)
