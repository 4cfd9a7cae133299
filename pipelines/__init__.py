"""Models, the live stream pipeline and its parts.

Importing diffusers imports transformers' CLIP and SigLIP image processors, and without torchvision
(which this project does not use: no pipeline here runs an image processor) transformers warns at
every start that it falls back to their PIL versions and suggests installing torchvision. That one
warning is dropped here, before anything imports diffusers; every other transformers message stays.
"""

import logging


class _NoTorchvisionFallbackNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "requires torchvision (not installed); falling back to" not in record.getMessage()


logging.getLogger("transformers.utils.import_utils").addFilter(_NoTorchvisionFallbackNotice())
