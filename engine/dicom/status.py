"""DIMSE status codes the SCP answers with (PS3.4 Annex B, C, K; PS3.7 Annex C)."""

SUCCESS = 0x0000
PENDING = 0xFF00
CANCEL = 0xFE00
# C-STORE
OUT_OF_RESOURCES = 0xA700  # storage full or below the free-space floor
DATASET_MISMATCH = 0xA900  # Data Set does not match SOP Class (IOD): SOP UIDs differ from the command, Study/Series UID missing
CANNOT_UNDERSTAND = 0xC000  # the dataset could not be parsed
INVALID_UID = 0xC002  # a UID with characters or length DICOM does not allow
PROCESSING_FAILURE = 0x0110  # the index could not be committed (database unavailable): nothing stored
UID_CONFLICT = 0xC409  # Cxxx (cannot understand): a Series UID of another study (dcm4chee's code for a study UID clash)
DUPLICATE_SOP_INSTANCE = 0x0111  # duplicates: reject and the content differs from the stored instance
# C-FIND / C-MOVE / C-GET
IDENTIFIER_MISMATCH = 0xA900
UNABLE_TO_PROCESS = 0xC001
MOVE_DESTINATION_UNKNOWN = 0xA801
SUBOPS_WARNING = 0xB000  # one or more sub-operations failed
# N-EVENT-REPORT / N-ACTION (PS3.7 10.1.1.1.8, 10.1.4.1.10): Storage Commitment
NO_SUCH_EVENT_TYPE = 0x0113
NO_SUCH_ARGUMENT = 0x0114  # a required attribute (Transaction UID, Referenced SOP Sequence ...) is missing
INVALID_ARGUMENT_VALUE = 0x0115  # a value is wrong: an unknown Transaction UID, an undecodable Event Information
INVALID_OBJECT_INSTANCE = 0x0117
NO_SUCH_SOP_CLASS = 0x0118
UNRECOGNIZED_OPERATION = 0x0211  # an N-ACTION to the engine: it is not a Storage Commitment SCP
RESOURCE_LIMITATION = 0x0213
