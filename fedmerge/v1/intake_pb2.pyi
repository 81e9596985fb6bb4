from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ExpertFormat(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    EXPERT_FORMAT_UNSPECIFIED: _ClassVar[ExpertFormat]
    EXPERT_FORMAT_CHECKPOINT: _ClassVar[ExpertFormat]
    EXPERT_FORMAT_PEFT_TAR: _ClassVar[ExpertFormat]
    EXPERT_FORMAT_DELTA_PACKAGE: _ClassVar[ExpertFormat]

class SubmissionState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SUBMISSION_STATE_UNSPECIFIED: _ClassVar[SubmissionState]
    SUBMISSION_STATE_QUEUED: _ClassVar[SubmissionState]
    SUBMISSION_STATE_MERGED: _ClassVar[SubmissionState]
    SUBMISSION_STATE_REJECTED: _ClassVar[SubmissionState]
    SUBMISSION_STATE_FAILED: _ClassVar[SubmissionState]
EXPERT_FORMAT_UNSPECIFIED: ExpertFormat
EXPERT_FORMAT_CHECKPOINT: ExpertFormat
EXPERT_FORMAT_PEFT_TAR: ExpertFormat
EXPERT_FORMAT_DELTA_PACKAGE: ExpertFormat
SUBMISSION_STATE_UNSPECIFIED: SubmissionState
SUBMISSION_STATE_QUEUED: SubmissionState
SUBMISSION_STATE_MERGED: SubmissionState
SUBMISSION_STATE_REJECTED: SubmissionState
SUBMISSION_STATE_FAILED: SubmissionState

class SubmitHeader(_message.Message):
    __slots__ = ("format", "base_version", "total_size", "sha256", "bulk_object", "label")
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    BASE_VERSION_FIELD_NUMBER: _ClassVar[int]
    TOTAL_SIZE_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    BULK_OBJECT_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    format: ExpertFormat
    base_version: str
    total_size: int
    sha256: str
    bulk_object: str
    label: str
    def __init__(self, format: _Optional[_Union[ExpertFormat, str]] = ..., base_version: _Optional[str] = ..., total_size: _Optional[int] = ..., sha256: _Optional[str] = ..., bulk_object: _Optional[str] = ..., label: _Optional[str] = ...) -> None: ...

class SubmitChunk(_message.Message):
    __slots__ = ("header", "data")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    header: SubmitHeader
    data: bytes
    def __init__(self, header: _Optional[_Union[SubmitHeader, _Mapping]] = ..., data: _Optional[bytes] = ...) -> None: ...

class SubmitReply(_message.Message):
    __slots__ = ("submission_id", "sha256", "duplicate", "state")
    SUBMISSION_ID_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    submission_id: str
    sha256: str
    duplicate: bool
    state: SubmissionState
    def __init__(self, submission_id: _Optional[str] = ..., sha256: _Optional[str] = ..., duplicate: _Optional[bool] = ..., state: _Optional[_Union[SubmissionState, str]] = ...) -> None: ...

class GetSubmissionRequest(_message.Message):
    __slots__ = ("submission_id",)
    SUBMISSION_ID_FIELD_NUMBER: _ClassVar[int]
    submission_id: str
    def __init__(self, submission_id: _Optional[str] = ...) -> None: ...

class Submission(_message.Message):
    __slots__ = ("submission_id", "sha256", "client_id", "state", "version", "reason", "size", "label", "sequence")
    SUBMISSION_ID_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    submission_id: str
    sha256: str
    client_id: str
    state: SubmissionState
    version: str
    reason: str
    size: int
    label: str
    sequence: int
    def __init__(self, submission_id: _Optional[str] = ..., sha256: _Optional[str] = ..., client_id: _Optional[str] = ..., state: _Optional[_Union[SubmissionState, str]] = ..., version: _Optional[str] = ..., reason: _Optional[str] = ..., size: _Optional[int] = ..., label: _Optional[str] = ..., sequence: _Optional[int] = ...) -> None: ...

class VersionInfo(_message.Message):
    __slots__ = ("id", "content_hash", "kind", "method", "parents", "submissions", "created_at", "num_merged", "manifest_json")
    ID_FIELD_NUMBER: _ClassVar[int]
    CONTENT_HASH_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    PARENTS_FIELD_NUMBER: _ClassVar[int]
    SUBMISSIONS_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    NUM_MERGED_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_JSON_FIELD_NUMBER: _ClassVar[int]
    id: str
    content_hash: str
    kind: str
    method: str
    parents: _containers.RepeatedScalarFieldContainer[str]
    submissions: _containers.RepeatedScalarFieldContainer[str]
    created_at: str
    num_merged: int
    manifest_json: str
    def __init__(self, id: _Optional[str] = ..., content_hash: _Optional[str] = ..., kind: _Optional[str] = ..., method: _Optional[str] = ..., parents: _Optional[_Iterable[str]] = ..., submissions: _Optional[_Iterable[str]] = ..., created_at: _Optional[str] = ..., num_merged: _Optional[int] = ..., manifest_json: _Optional[str] = ...) -> None: ...

class ListVersionsRequest(_message.Message):
    __slots__ = ("limit",)
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    limit: int
    def __init__(self, limit: _Optional[int] = ...) -> None: ...

class ListVersionsReply(_message.Message):
    __slots__ = ("versions",)
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    versions: _containers.RepeatedCompositeFieldContainer[VersionInfo]
    def __init__(self, versions: _Optional[_Iterable[_Union[VersionInfo, _Mapping]]] = ...) -> None: ...

class GetVersionRequest(_message.Message):
    __slots__ = ("version", "full_weights", "chunk_size")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    FULL_WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    CHUNK_SIZE_FIELD_NUMBER: _ClassVar[int]
    version: str
    full_weights: bool
    chunk_size: int
    def __init__(self, version: _Optional[str] = ..., full_weights: _Optional[bool] = ..., chunk_size: _Optional[int] = ...) -> None: ...

class VersionChunk(_message.Message):
    __slots__ = ("info", "data", "total_size")
    INFO_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    TOTAL_SIZE_FIELD_NUMBER: _ClassVar[int]
    info: VersionInfo
    data: bytes
    total_size: int
    def __init__(self, info: _Optional[_Union[VersionInfo, _Mapping]] = ..., data: _Optional[bytes] = ..., total_size: _Optional[int] = ...) -> None: ...

class WatchVersionsRequest(_message.Message):
    __slots__ = ("after",)
    AFTER_FIELD_NUMBER: _ClassVar[int]
    after: str
    def __init__(self, after: _Optional[str] = ...) -> None: ...

class BulkBeginRequest(_message.Message):
    __slots__ = ("sha256", "total_size")
    SHA256_FIELD_NUMBER: _ClassVar[int]
    TOTAL_SIZE_FIELD_NUMBER: _ClassVar[int]
    sha256: str
    total_size: int
    def __init__(self, sha256: _Optional[str] = ..., total_size: _Optional[int] = ...) -> None: ...

class BulkStatus(_message.Message):
    __slots__ = ("sha256", "total_size", "offset", "complete")
    SHA256_FIELD_NUMBER: _ClassVar[int]
    TOTAL_SIZE_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    COMPLETE_FIELD_NUMBER: _ClassVar[int]
    sha256: str
    total_size: int
    offset: int
    complete: bool
    def __init__(self, sha256: _Optional[str] = ..., total_size: _Optional[int] = ..., offset: _Optional[int] = ..., complete: _Optional[bool] = ...) -> None: ...

class BulkChunk(_message.Message):
    __slots__ = ("sha256", "offset", "data")
    SHA256_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    sha256: str
    offset: int
    data: bytes
    def __init__(self, sha256: _Optional[str] = ..., offset: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class UnaryUploadRequest(_message.Message):
    __slots__ = ("data",)
    DATA_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    def __init__(self, data: _Optional[bytes] = ...) -> None: ...
