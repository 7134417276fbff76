"""Every skinreg tag key, named once (as MLflow names its own in mlflow/utils/mlflow_tags.py).
Source versions carry `export.*`; variant versions carry the rest. All keys start with PREFIX.
On a variant version, EXPORT_RUN names the run that made that file; on a source version, EXPORT_RUN_ID
names its latest export run (both sealed: seal.py)."""

PREFIX = "skinreg."

ACCURACY = PREFIX + "accuracy"
ACCURACY_DROP = PREFIX + "accuracy_drop"
ARCH = PREFIX + "arch"
CONSUMER_CHECK = PREFIX + "consumer_check"
CONVERTER = PREFIX + "converter"
CONVERTER_VERSION = PREFIX + "converter_version"
DYNAMIC_BATCH = PREFIX + "dynamic_batch"
EXPORT_CACHE = PREFIX + "export.cache"  # on an export run that reused a stored export: its key and date
EXPORT_FAILED = PREFIX + "export.failed"
EXPORT_REASON = PREFIX + "export.reason"
EXPORT_RUN_ID = PREFIX + "export.run_id"
EXPORT_SETTINGS = PREFIX + "export.settings"
EXPORT_STATUS = PREFIX + "export.status"
EXPORT_VARIANTS = PREFIX + "export.variants"
EXPORT_RUN = PREFIX + "export_run"
FAILURE = PREFIX + "failure"
FORMAT = PREFIX + "format"
GATE = PREFIX + "gate"
INPUT = PREFIX + "input"  # what the file takes: "float32 normalized", "uint8 pixels" (app-ready), ...
INPUT_SHAPE = PREFIX + "input_shape"
INPUT_SIZE = PREFIX + "input_size"
LABELS = PREFIX + "labels"
PARITY_MAX_ABS = PREFIX + "parity_max_abs"
PRECISION = PREFIX + "precision"
SETTINGS = PREFIX + "settings"
# on an export run: each effective export setting and where it came from (command line, tag, hooks, default)
SETTINGS_EFFECTIVE = PREFIX + "settings.effective"
# on a registered model or a version: `skinreg.export.<field>` sets an export setting (registry/export_tags.py)
EXPORT_SETTING_PREFIX = PREFIX + "export."
SIZE_BYTES = PREFIX + "size_bytes"
SOURCE = PREFIX + "source"
SOURCE_NAME = PREFIX + "source_name"
SOURCE_RUN = PREFIX + "source_run"
SOURCE_VERSION = PREFIX + "source_version"
STATUS = PREFIX + "status"
VAL_ACCURACY = PREFIX + "val_accuracy"
VARIANT = PREFIX + "variant"
VARIANT_OF = PREFIX + "variant_of"
INT8_RECIPE = PREFIX + "int8_recipe"
PARITY_TOP1_AGREEMENT = PREFIX + "parity_top1_agreement"
SHA256 = PREFIX + "sha256"
LATENCY_P90_MS = PREFIX + "latency_p90_ms"
LATENCY_P50_MS = PREFIX + "latency_p50_ms"

# Sealed records (seal.py): what skinreg acts on. The plain tags above are for people.
EXPORT_RECORD = PREFIX + "export.record"  # on a source version: the export's facts
LINEAGE = PREFIX + "lineage"  # on a variant version: where it came from, and its served files
VARIANT_OF_RECORD = PREFIX + "variant_of.record"  # on a variant model: its source
MANIFEST = PREFIX + "manifest"  # a lineage fact: {served file: sha256}
