"""hf-mvam: fine-grained image-text matching (MVAM and UARDA) for the Hugging Face ecosystem.

Importing the package registers the model classes for ``trust_remote_code`` saving: a folder
written by ``save_pretrained`` carries ``auto_map`` and the code files, so it loads with
``AutoModel``/``AutoProcessor`` where hf_mvam is not installed.
"""

from .configuration_mvam import MVAMConfig
from .modeling_mvam import MVAMModel, MVAMOutput
from .processing_mvam import MVAMProcessor

MVAMConfig.register_for_auto_class()
MVAMModel.register_for_auto_class("AutoModel")
MVAMProcessor.register_for_auto_class("AutoProcessor")

__all__ = ["MVAMConfig", "MVAMModel", "MVAMOutput", "MVAMProcessor"]
