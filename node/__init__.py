"""libra-node: a DICOM node that sends draft chest radiograph reports written by Libra."""

__version__ = "0.1.0"
