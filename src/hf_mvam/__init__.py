"""hf-mvam: fine-grained image-text matching (MVAM and UARDA) for the Hugging Face ecosystem.

Importing the package registers the model classes for ``trust_remote_code`` saving: a folder
written by ``save_pretrained`` carries ``auto_map`` and the code files, so it loads with
``AutoModel``/``AutoProcessor`` where hf_mvam is not installed.
"""

from .configuration_mvam import MVAMConfig
from .configuration_uarda import UARDAConfig
from .modeling_mvam import MVAMModel, MVAMOutput
from .modeling_uarda import UARDAModel, UARDAOutput
from .processing_mvam import MVAMProcessor
from .processing_uarda import UARDAProcessor

#: The model types, each with its configuration, model and processor class: the one registry that
#: the training script, evaluation and the Hub code look model types up in.
MODEL_CLASSES = {
    "mvam": (MVAMConfig, MVAMModel, MVAMProcessor),
    "uarda": (UARDAConfig, UARDAModel, UARDAProcessor),
}

for _config, _model, _processor in MODEL_CLASSES.values():
    _config.register_for_auto_class()
    _model.register_for_auto_class("AutoModel")
    _processor.register_for_auto_class("AutoProcessor")

__all__ = [
    "MODEL_CLASSES", "MVAMConfig", "MVAMModel", "MVAMOutput", "MVAMProcessor",
    "UARDAConfig", "UARDAModel", "UARDAOutput", "UARDAProcessor",
]
