from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DeltaKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DELTA_KIND_UNSPECIFIED: _ClassVar[DeltaKind]
    DELTA_KIND_TASK_VECTOR: _ClassVar[DeltaKind]
    DELTA_KIND_LORA: _ClassVar[DeltaKind]

class ValueEncoding(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    VALUE_ENCODING_UNSPECIFIED: _ClassVar[ValueEncoding]
    VALUE_ENCODING_FP32: _ClassVar[ValueEncoding]
    VALUE_ENCODING_FP16: _ClassVar[ValueEncoding]
    VALUE_ENCODING_BF16: _ClassVar[ValueEncoding]
    VALUE_ENCODING_INT8: _ClassVar[ValueEncoding]
    VALUE_ENCODING_INT4: _ClassVar[ValueEncoding]
    VALUE_ENCODING_SIGN: _ClassVar[ValueEncoding]

class IndexEncoding(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    INDEX_ENCODING_UNSPECIFIED: _ClassVar[IndexEncoding]
    INDEX_ENCODING_DENSE: _ClassVar[IndexEncoding]
    INDEX_ENCODING_COO_INT32: _ClassVar[IndexEncoding]
    INDEX_ENCODING_BITMAP: _ClassVar[IndexEncoding]
    INDEX_ENCODING_GAP_VARINT: _ClassVar[IndexEncoding]
    INDEX_ENCODING_GAP_RICE: _ClassVar[IndexEncoding]
    INDEX_ENCODING_SEEDED: _ClassVar[IndexEncoding]
    INDEX_ENCODING_LOW_RANK: _ClassVar[IndexEncoding]
DELTA_KIND_UNSPECIFIED: DeltaKind
DELTA_KIND_TASK_VECTOR: DeltaKind
DELTA_KIND_LORA: DeltaKind
VALUE_ENCODING_UNSPECIFIED: ValueEncoding
VALUE_ENCODING_FP32: ValueEncoding
VALUE_ENCODING_FP16: ValueEncoding
VALUE_ENCODING_BF16: ValueEncoding
VALUE_ENCODING_INT8: ValueEncoding
VALUE_ENCODING_INT4: ValueEncoding
VALUE_ENCODING_SIGN: ValueEncoding
INDEX_ENCODING_UNSPECIFIED: IndexEncoding
INDEX_ENCODING_DENSE: IndexEncoding
INDEX_ENCODING_COO_INT32: IndexEncoding
INDEX_ENCODING_BITMAP: IndexEncoding
INDEX_ENCODING_GAP_VARINT: IndexEncoding
INDEX_ENCODING_GAP_RICE: IndexEncoding
INDEX_ENCODING_SEEDED: IndexEncoding
INDEX_ENCODING_LOW_RANK: IndexEncoding

class TensorDelta(_message.Message):
    __slots__ = ("name", "shape", "dtype", "value_encoding", "index_encoding", "nnz", "block_size", "block_scales", "indices", "values", "rice_k", "seed", "keep_threshold", "checksum", "rank")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    VALUE_ENCODING_FIELD_NUMBER: _ClassVar[int]
    INDEX_ENCODING_FIELD_NUMBER: _ClassVar[int]
    NNZ_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SCALES_FIELD_NUMBER: _ClassVar[int]
    INDICES_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    RICE_K_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    KEEP_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    CHECKSUM_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    name: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    dtype: str
    value_encoding: ValueEncoding
    index_encoding: IndexEncoding
    nnz: int
    block_size: int
    block_scales: bytes
    indices: bytes
    values: bytes
    rice_k: int
    seed: int
    keep_threshold: int
    checksum: bytes
    rank: int
    def __init__(self, name: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., dtype: _Optional[str] = ..., value_encoding: _Optional[_Union[ValueEncoding, str]] = ..., index_encoding: _Optional[_Union[IndexEncoding, str]] = ..., nnz: _Optional[int] = ..., block_size: _Optional[int] = ..., block_scales: _Optional[bytes] = ..., indices: _Optional[bytes] = ..., values: _Optional[bytes] = ..., rice_k: _Optional[int] = ..., seed: _Optional[int] = ..., keep_threshold: _Optional[int] = ..., checksum: _Optional[bytes] = ..., rank: _Optional[int] = ...) -> None: ...

class DeltaPackage(_message.Message):
    __slots__ = ("format_version", "client_id", "round", "base_version_id", "base_version_hash", "kind", "num_examples", "lora_rank", "lora_alpha", "lora_target_modules", "metadata", "tensors", "checksum")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    FORMAT_VERSION_FIELD_NUMBER: _ClassVar[int]
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    BASE_VERSION_ID_FIELD_NUMBER: _ClassVar[int]
    BASE_VERSION_HASH_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    NUM_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    LORA_RANK_FIELD_NUMBER: _ClassVar[int]
    LORA_ALPHA_FIELD_NUMBER: _ClassVar[int]
    LORA_TARGET_MODULES_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    CHECKSUM_FIELD_NUMBER: _ClassVar[int]
    format_version: int
    client_id: str
    round: int
    base_version_id: str
    base_version_hash: str
    kind: DeltaKind
    num_examples: int
    lora_rank: int
    lora_alpha: float
    lora_target_modules: _containers.RepeatedScalarFieldContainer[str]
    metadata: _containers.ScalarMap[str, str]
    tensors: _containers.RepeatedCompositeFieldContainer[TensorDelta]
    checksum: bytes
    def __init__(self, format_version: _Optional[int] = ..., client_id: _Optional[str] = ..., round: _Optional[int] = ..., base_version_id: _Optional[str] = ..., base_version_hash: _Optional[str] = ..., kind: _Optional[_Union[DeltaKind, str]] = ..., num_examples: _Optional[int] = ..., lora_rank: _Optional[int] = ..., lora_alpha: _Optional[float] = ..., lora_target_modules: _Optional[_Iterable[str]] = ..., metadata: _Optional[_Mapping[str, str]] = ..., tensors: _Optional[_Iterable[_Union[TensorDelta, _Mapping]]] = ..., checksum: _Optional[bytes] = ...) -> None: ...
