"""tinkex_trio: a trio-native SDK for the Tinker fine-tuning API."""

from tinkex_trio._version import __version__ as __version__
