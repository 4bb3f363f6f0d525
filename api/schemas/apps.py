"""Schemas of the App resource (with default build settings and auto-approve)."""
from __future__ import annotations

from marshmallow import Schema, ValidationError, fields, validate, validates_schema

from api.schemas.builds import ConverterOptionsSchema, NitroEnclavesOptionsSchema, image_reference
from api.schemas.common import MAX_OFFSET, PageMetadataSchema, group_filter


class NitroDefaultsSchema(NitroEnclavesOptionsSchema):
    converter_options = fields.Nested(ConverterOptionsSchema, load_default=None, allow_none=True)


_ISV = validate.Range(min=0, max=65535)


class SgxDefaultsSchema(Schema):
    """CCM's DefaultSgxBuildSettings: recorded and returned (no SGX builds here)."""

    isvprodid = fields.Integer(validate=_ISV)
    mem_size = fields.Integer(validate=validate.Range(min=1, max=2**40))
    threads = fields.Integer(validate=validate.Range(min=1, max=4096))


class DefaultBuildSettingsSchema(Schema):
    nitro_enclaves = fields.Nested(NitroDefaultsSchema, load_default=None, allow_none=True)
    sgx = fields.Nested(SgxDefaultsSchema, load_default=None, allow_none=True)

def _labels(**kwargs: object) -> fields.Dict:
    """A map of strings (CCM's labels and custom_metadata)."""
    return fields.Dict(keys=fields.String(validate=validate.Length(min=1, max=255)),
                       values=fields.String(validate=validate.Length(max=4096)), **kwargs)  # type: ignore[arg-type]


class PatchOperationSchema(Schema):
    """CCM's PatchDocument (RFC 6902, the subset CCM takes) on `labels`/`custom_metadata`: `/key` with a string
    value sets or removes one key; `/` with an object value (CCM documents the value as an object) adds or
    replaces each of its keys."""

    op = fields.String(required=True, validate=validate.OneOf(("add", "replace", "remove")))
    path = fields.String(required=True, validate=validate.Regexp(r"^/[^/]{0,255}$"))
    value = fields.Raw(load_default=None, allow_none=True)

    @validates_schema
    def _value_fits_path(self, data: dict[str, object], **_: object) -> None:
        value, whole = data.get("value"), data["path"] == "/"
        if data["op"] == "remove":
            if whole:
                raise ValidationError("name the key to remove", "path")
            return
        if whole:
            if not isinstance(value, dict) or not all(
                    isinstance(k, str) and 0 < len(k) <= 255 and isinstance(v, str) and len(v) <= 4096
                    for k, v in value.items()):
                raise ValidationError("an object of strings (keys 1-255, values up to 4096 characters)", "value")
        elif not isinstance(value, str) or len(value) > 4096:
            raise ValidationError("a string of up to 4096 characters", "value")


# How LabelsPatchField is documented: a map, or CCM's PatchRequest.
_LABELS_FORMS = [{"type": "object", "additionalProperties": {"type": "string"}}, {"type": "array", "items": {
    "type": "object", "required": ["op", "path"], "properties": {
        "op": {"type": "string", "enum": ["add", "replace", "remove"]}, "path": {"type": "string"},
        "value": {"description": "a string for `/key`, an object of strings for `/`"}}}}]


class LabelsPatchField(fields.Field):
    """A map that replaces the current one, or CCM's PatchRequest (a list of PatchDocuments)."""

    def _deserialize(self, value: object, attr: str | None, data: object, **kwargs: object) -> object:
        if isinstance(value, list):
            return PatchOperationSchema(many=True).load(value)
        return _labels().deserialize(value)


class CertificatePolicySchema(Schema):
    """CCM's CertificateIssuancePolicy: recorded and returned (this service issues no certificates)."""

    require_known_image = fields.Boolean(required=True)
    require_known_signer = fields.Boolean(required=True)
    require_known_node = fields.Boolean(load_default=True)


class SgxSignerSchema(Schema):
    mrsigner = fields.String(required=True, validate=validate.Regexp(r"^[0-9a-fA-F]{64}$"))
    isvprodid = fields.Integer(required=True, validate=_ISV)


class NitroSignerSchema(Schema):
    pcr8 = fields.String(required=True, validate=validate.Regexp(r"^[0-9a-fA-F]{96}$"),
                         metadata={"description": "PCR8 (SHA-384 of the signing certificate) in hex"})


class ApplicationSignerSchema(Schema):
    """CCM's ApplicationSigner: exactly one of `sgx` and `nitro_enclave`."""

    sgx = fields.Nested(SgxSignerSchema)
    nitro_enclave = fields.Nested(NitroSignerSchema)

    @validates_schema
    def _exactly_one(self, data: dict[str, object], **_: object) -> None:
        if len(data) != 1:
            raise ValidationError("give exactly one of sgx and nitro_enclave")


def _signers(**kwargs: object) -> fields.List:
    return fields.List(fields.Nested(ApplicationSignerSchema), validate=validate.Length(max=100),
                       **kwargs)  # type: ignore[arg-type]


class AppCreateSchema(Schema):
    name = fields.String(required=True, validate=validate.Length(min=1, max=255))
    description = fields.String(load_default="", validate=validate.Length(max=4096))
    input_image_name = fields.String(load_default=None, allow_none=True, validate=image_reference)
    output_image_name = fields.String(load_default=None, allow_none=True, validate=image_reference)
    default_build_settings = fields.Nested(DefaultBuildSettingsSchema, load_default=None, allow_none=True)
    auto_approve = fields.Boolean(load_default=False)
    # CCM's App fields: recorded and returned (builds take their sizes from default_build_settings.nitro_enclaves)
    isvprodid = fields.Integer(load_default=0, validate=_ISV)
    isvsvn = fields.Integer(load_default=0, validate=_ISV)
    mem_size = fields.Integer(load_default=2048, validate=validate.Range(min=1, max=2**40))
    threads = fields.Integer(load_default=2, validate=validate.Range(min=1, max=4096))
    allowed_domains = fields.List(fields.String(validate=validate.Length(min=1, max=255)), load_default=list,
                                  validate=validate.Length(max=1000))
    labels = _labels(load_default=dict, validate=validate.Length(max=1000))
    custom_metadata = _labels(load_default=dict, validate=validate.Length(max=1000))
    advanced_settings = fields.Dict(keys=fields.String(), values=fields.Raw(allow_none=True), load_default=dict)
    certificate_policy = fields.Nested(CertificatePolicySchema, load_default=None, allow_none=True)
    signers = _signers(load_default=list)
    group_id = fields.UUID(load_default=None, allow_none=True, metadata={"description": "recorded (no groups here)"})


class AppUpdateSchema(Schema):
    name = fields.String(validate=validate.Length(min=1, max=255))
    description = fields.String(validate=validate.Length(max=4096))
    input_image_name = fields.String(allow_none=True, validate=image_reference)
    output_image_name = fields.String(allow_none=True, validate=image_reference)
    default_build_settings = fields.Nested(DefaultBuildSettingsSchema, allow_none=True)
    auto_approve = fields.Boolean()
    isvprodid = fields.Integer(validate=_ISV)
    isvsvn = fields.Integer(validate=_ISV)
    mem_size = fields.Integer(validate=validate.Range(min=1, max=2**40))
    threads = fields.Integer(validate=validate.Range(min=1, max=4096))
    allowed_domains = fields.List(fields.String(validate=validate.Length(min=1, max=255)),
                                  validate=validate.Length(max=1000))
    labels = LabelsPatchField(metadata={"description": "a map replacing the labels, or CCM's PatchRequest",
                                        "oneOf": _LABELS_FORMS})
    custom_metadata = LabelsPatchField(metadata={"description": "a map replacing it, or CCM's PatchRequest",
                                                 "oneOf": _LABELS_FORMS})
    advanced_settings = fields.Dict(keys=fields.String(), values=fields.Raw(allow_none=True))
    certificate_policy = fields.Nested(CertificatePolicySchema, allow_none=True)
    signers = _signers()
    group_id = fields.UUID(allow_none=True)


class AppSchema(Schema):
    app_id = fields.UUID(required=True)
    acct_id = fields.UUID(required=True)
    name = fields.String(required=True)
    description = fields.String(required=True)
    input_image_name = fields.String(required=True, metadata={"description": "empty when not set"})
    output_image_name = fields.String(required=True, metadata={"description": "empty when not set"})
    default_build_settings = fields.Dict(required=True)
    auto_approve = fields.Boolean(required=True)
    created_at = fields.Integer(required=True)
    updated_at = fields.Integer(required=True)
    isvprodid = fields.Integer(required=True)
    isvsvn = fields.Integer(required=True)
    mem_size = fields.Integer(required=True)
    threads = fields.Integer(required=True)
    allowed_domains = fields.List(fields.String(), required=True)
    labels = fields.Dict(keys=fields.String(), values=fields.String(), required=True)
    custom_metadata = fields.Dict(keys=fields.String(), values=fields.String(), required=True)
    advanced_settings = fields.Dict(required=True)
    certificate_policy = fields.Nested(CertificatePolicySchema, allow_none=True)
    signers = fields.List(fields.Nested(ApplicationSignerSchema), required=True)
    group_id = fields.UUID(allow_none=True)


class AppListQuerySchema(Schema):
    limit = fields.Integer(load_default=100, validate=validate.Range(min=1, max=1000))
    offset = fields.Integer(load_default=0, validate=validate.Range(min=0, max=MAX_OFFSET))
    name = fields.String(load_default=None)
    description = fields.String(load_default=None)
    all_search = fields.String(load_default=None, validate=validate.Length(max=255),
                               metadata={"description": "in the name and description (case-insensitive)"})
    sort_by = fields.String(load_default="created_at:ASC", validate=validate.Regexp(
        r"^(created_at|updated_at|name)(:(ASC|DESC))?(,(created_at|updated_at|name)(:(ASC|DESC))?){0,2}$"),
        metadata={"description": "CCM's `key1:ASC,key2:DESC`"})
    filter = group_filter(load_default=None)


class AppListSchema(Schema):
    metadata = fields.Nested(PageMetadataSchema, required=True)
    items = fields.List(fields.Nested(AppSchema), required=True)


class LabelCountSchema(Schema):
    key = fields.String(required=True)
    value = fields.String(required=True)
    count = fields.Integer(required=True)


class LabelsCountSchema(Schema):
    items = fields.List(fields.Nested(LabelCountSchema), required=True)
