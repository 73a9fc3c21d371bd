"""nemo_jstip: joint speech-text interleaved pretraining (JSTIP) for speech-LLMs, as a NeMo plugin.

Importing it registers the plugin with NeMo: ``nemo_jstip.`` joins the prefixes NeMo instantiates from a config
(``ALLOWED_TARGET_PREFIXES``), so ``nemo.core.classes.ModelPT.restore_from("model.nemo")`` builds the
``JSTIPModel`` a .nemo names (which then reads the file through ``nemo_jstip/checkpoint.py``'s vetted loader).
"""

from nemo.core.classes.common import ALLOWED_TARGET_PREFIXES

__version__ = "0.1.0"

if "nemo_jstip." not in ALLOWED_TARGET_PREFIXES:
    ALLOWED_TARGET_PREFIXES.append("nemo_jstip.")


def __getattr__(name):  # JSTIPModel imports megatron-core and NeMo's ASR collection: only when asked for
    if name == "JSTIPModel":
        from nemo_jstip.models.jstip_model import JSTIPModel

        return JSTIPModel
    raise AttributeError(name)
