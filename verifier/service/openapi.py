"""The OpenAPI 3.1 document served at ``GET /openapi.json``.

Kept by hand next to the routes; a test checks that its paths and methods are
exactly the app's registered routes, so neither can drift.
"""

from __future__ import annotations

from typing import Any

__all__ = ["openapi_spec"]

_PROBLEM = {"$ref": "#/components/responses/Problem"}
_B64 = {"type": "string", "contentEncoding": "base64"}
_PCRS = {
    "type": "object",
    "description": 'PCR values per bank: {"sha256": {"0": "<hex>", ...}}',
    "additionalProperties": {"type": "object", "additionalProperties": {"type": "string"}},
}
_ID = {"name": "attester_id", "in": "path", "required": True, "schema": {"type": "string"}}
_NAME = {"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}
# verifier.ear.PROFILE_NAMES (a full eat_profile tag is accepted too)
_EAR_PROFILE = {
    "name": "ear_profile",
    "in": "query",
    "description": "EAR profile of the returned results' `ear`: veraison-2023 "
    "(tag:github.com,2023:veraison/ear) or ietf-ear-04 (tag:ietf.org,2026:rats/ear#04); "
    "default: the verifier's `ear_profile` setting",
    "schema": {"type": "string", "enum": ["veraison-2023", "ietf-ear-04"]},
}

# GET /v1/attesters and its history route (issue 16)
_STATE = {
    "name": "state",
    "in": "query",
    "description": "only attesters in this state",
    "schema": {"type": "string", "enum": ["unknown", "trusted", "failed", "stale"]},
}
_PAGE_LIMIT = {
    "name": "limit",
    "in": "query",
    "schema": {"type": "integer", "minimum": 1, "maximum": 1000, "default": 100},
}


# issue 14: the IMA delta in evidence (docs/ima.md, "Attesting with IMA")
_IMA_DELTA = {
    "type": "object",
    "required": ["start_index", "entries"],
    "description": "The IMA measurement-list entries after the verified ones, needed when "
    "the policy has a `runtime` part. Read the list after the quote; send from the "
    "challenge's `ima.next_index` (from 0 when the quote's resetCount/restartCount differ "
    "from the challenge's `ima`). The entries are replayed onto the stored PCR 10 values "
    "until they equal the quoted PCR 10 in every quoted bank; entries past that point are "
    "pending (send them again). Refused: a delta that does not start at the verified "
    "count (409, nothing recorded), one that does not reach the quoted PCR 10 (a gap, "
    "reordering or replayed suffix: contraindicated, rule ima.pcr10), a malformed entry "
    "(400 naming `ima_entry[INDEX]` and the byte offset), a delta over "
    "`ima_max_delta_bytes`/`ima_max_delta_entries` (400) or the body limit (413). The "
    "result's `report.ima` says what was proven and `next_index`; every failing entry is "
    "a failure with rule `ima.entry` naming index, path, template, expected and actual "
    "digests and signature state (in the EAR's failures too: ima_index, ima_path, "
    "ima_template, ima_signature).",
    "properties": {
        "start_index": {
            "type": "integer",
            "minimum": 0,
            "description": "list index of the first entry sent",
        },
        "entries": {
            **_B64,
            "description": "binary_runtime_measurements bytes from that "
            "entry on (or the ASCII lines); may be empty",
        },
        "extend": {
            "type": "string",
            "enum": ["per-bank", "sha1-padded"],
            "default": "per-bank",
            "description": "how the kernel extends PCR 10: per-bank template digests "
            "(Linux >= 5.8) or the SHA-1 one zero-padded (older kernels)",
        },
    },
}


def _after(description: str) -> dict[str, Any]:
    return {
        "name": "after",
        "in": "query",
        "description": description,
        "schema": {"type": "string"},
    }


def _op(
    summary: str,
    security: list[str] | None,
    *,
    params: list[dict[str, Any]] | None = None,
    body: dict[str, Any] | None = None,
    ok: str = "200",
    errors: tuple[str, ...] = ("400", "401", "403", "404"),
) -> dict[str, Any]:
    op: dict[str, Any] = {
        "summary": summary,
        "responses": {ok: {"description": "success"}, **{e: _PROBLEM for e in errors}},
    }
    op["security"] = [{"bearer": []}] if security else []
    if security:
        op["x-roles"] = security
    if params:
        op["parameters"] = params
    if body is not None:
        op["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": body}},
        }
    return op


def _webhook_paths() -> dict[str, Any]:
    """Webhook subscriptions and deliveries (issue 16; docs/continuous.md "Webhooks")."""
    subscription = {
        "type": "object",
        "required": ["url"],
        "properties": {
            "url": {"type": "string", "format": "uri", "maxLength": 2048},
            "events": {
                "type": "array",
                "items": {"type": "string"},
                "description": "'*', a state (transitions into it) or 'FROM->TO' with '*' "
                "on either side; states: unknown, trusted, failed, stale. Default ['*']",
            },
            "secret": {
                "type": "string",
                "minLength": 16,
                "maxLength": 128,
                "description": "HMAC key of X-Vtpm-Signature (default: generated, returned once)",
            },
            "enabled": {"type": "boolean"},
        },
    }
    sub_id = {
        "name": "subscription_id",
        "in": "path",
        "required": True,
        "schema": {"type": "string"},
    }
    delivery_id = {
        "name": "delivery_id",
        "in": "path",
        "required": True,
        "schema": {"type": "integer"},
    }
    state = {
        "name": "state",
        "in": "query",
        "schema": {"type": "string", "enum": ["pending", "delivering", "delivered", "dead"]},
    }
    webhook = {"name": "webhook", "in": "query", "schema": {"type": "string"}}
    queued = {
        "name": "queued",
        "in": "query",
        "schema": {"type": "string", "enum": ["deliver", "discard"], "default": "deliver"},
    }
    limit = {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1}}
    return {
        "/v1/webhooks": {
            "get": _op("List webhook subscriptions (secrets not shown)", ["admin"]),
            "post": _op(
                "Subscribe a URL to attester transitions", ["admin"], body=subscription, ok="201"
            ),
        },
        "/v1/webhooks/{subscription_id}": {
            "delete": _op(
                "Delete a subscription: no new deliveries; the queued ones are still"
                " delivered (queued=deliver) or marked dead (queued=discard)",
                ["admin"],
                params=[sub_id, queued],
            )
        },
        "/v1/webhook-deliveries": {
            "get": _op(
                "Deliveries, newest first, by state (dead: the dead letters)",
                ["admin"],
                params=[state, webhook, limit],
            )
        },
        "/v1/webhook-deliveries/{delivery_id}/redeliver": {
            "post": _op(
                "Queue a delivery again now, attempts reset",
                ["admin"],
                params=[delivery_id],
                errors=("401", "403", "404", "409"),
            )
        },
    }


def _put_policy(policy: dict[str, Any]) -> dict[str, Any]:
    """PUT takes JSON ``{policy}`` or the policy file itself (what ``vtpm policy learn`` wrote)."""
    op = _op("Create or replace a policy", ["admin"], params=[_NAME], body=policy)
    op["requestBody"]["content"]["application/yaml"] = {
        "schema": {"type": "string", "description": "a verifier.policy document (schema 1)"}
    }
    return op


def openapi_spec() -> dict[str, Any]:
    """The document (a fresh dict each call)."""
    registration = {
        "type": "object",
        "required": ["ak_public"],
        "properties": {
            "ek_certificate": {**_B64, "description": "EK certificate, DER"},
            "ek_public": {**_B64, "description": "EK TPM2B_PUBLIC (admin only without a cert)"},
            "ak_public": {**_B64, "description": "AK TPM2B_PUBLIC"},
            "vm_id": {"type": "string"},
        },
    }
    reappraisal = {
        "type": "object",
        "required": ["against"],
        "properties": {
            "against": {
                "oneOf": [
                    {"const": "fleet"},
                    {"type": "array", "items": {"type": "string"}, "minItems": 1},
                ],
                "description": '"fleet" (every attester with stored evidence) or attester ids',
            }
        },
    }
    evidence = {
        "type": "object",
        "required": ["nonce", "quote", "signature", "pcrs"],
        "properties": {
            "nonce": _B64,
            "quote": {**_B64, "description": "TPMS_ATTEST (tpm2_quote -m)"},
            "signature": {**_B64, "description": "TPMT_SIGNATURE (tpm2_quote -s)"},
            "pcrs": _PCRS,
            "event_log": {**_B64, "description": "TCG PC Client binary event log"},
            "ak_public": {**_B64, "description": "the AK the attester used (optional)"},
            "ima": _IMA_DELTA,
        },
    }
    policy = {
        "type": "object",
        "required": ["policy"],
        "properties": {"name": {"type": "string"}, "policy": {"type": ["string", "object"]}},
    }
    paths: dict[str, Any] = {
        "/v1/attesters": {
            "post": _op(
                "Register an attester (EK cert + AK); answers a MakeCredential challenge",
                None,
                body=registration,
                ok="201",
                errors=("400", "403", "413", "422"),
            ),
            "get": _op(
                "List attesters in id order, one page at a time (keyset: pass `next` as `after`)",
                ["admin", "reader"],
                params=[_STATE, _after("the `next` of the previous page"), _PAGE_LIMIT],
                errors=("400", "401", "403"),
            ),
        },
        "/v1/attesters/{attester_id}/history": {
            "get": _op(
                "State transitions (from, to, at, cause, result_id), newest first, paged",
                ["admin", "reader", "attester"],
                params=[
                    _ID,
                    _after("the `next` of the previous page (a transition id)"),
                    _PAGE_LIMIT,
                ],
            )
        },
        "/v1/attesters/{attester_id}": {
            "get": _op(
                "Identity, status, flags and latest result",
                ["admin", "reader", "attester"],
                params=[_ID, _EAR_PROFILE],
            ),
            "delete": _op("Forget an attester", ["admin"], params=[_ID], ok="204"),
        },
        "/v1/attesters/{attester_id}/activation": {
            "post": _op(
                "Prove the AK is in the EK's TPM; answers the attester's token",
                None,
                params=[_ID],
                body={"type": "object", "required": ["secret"], "properties": {"secret": _B64}},
                errors=("400", "403", "404", "409", "410"),
            )
        },
        "/v1/attesters/{attester_id}/challenges": {
            "post": _op(
                "A fresh single-use nonce and the PCR selection to quote; under a policy "
                "with a runtime part also `ima`: {next_index, reset_count, restart_count}, "
                "where the attester's IMA delta starts",
                ["attester", "admin"],
                params=[_ID],
                ok="201",
                errors=("401", "403", "404", "409"),
            )
        },
        "/v1/attesters/{attester_id}/evidence": {
            "post": _op(
                "Submit a quote for a nonce; answers the result and its EAR token",
                ["attester"],
                params=[_ID, _EAR_PROFILE],
                body=evidence,
                errors=("400", "401", "403", "404", "409", "410", "413"),
            )
        },
        "/v1/attesters/{attester_id}/faults": {
            "post": _op(
                "The agent cannot produce evidence (TPM failed, event log unreadable): "
                "the attester is failed at once, the fault recorded as the cause",
                ["attester"],
                params=[_ID],
                body={
                    "type": "object",
                    "required": ["kind"],
                    "properties": {
                        "kind": {"type": "string", "enum": ["tpm", "event_log", "ima_list"]},
                        "detail": {"type": "string", "maxLength": 500},
                    },
                },
                errors=("400", "401", "403", "404", "409"),
            )
        },
        "/v1/attesters/{attester_id}/results": {
            "get": _op(
                "Results, newest first",
                ["admin", "reader", "attester"],
                params=[
                    _ID,
                    {"name": "limit", "in": "query", "schema": {"type": "integer", "default": 20}},
                    _EAR_PROFILE,
                ],
            )
        },
        "/v1/attesters/{attester_id}/policy": {
            "put": _op(
                "Assign a policy (or null to unassign)",
                ["admin"],
                params=[_ID],
                body={"type": "object", "properties": {"policy": {"type": ["string", "null"]}}},
            )
        },
        "/v1/policies": {
            "get": _op("List policies", ["admin", "reader"]),
            "post": _op("Create a policy", ["admin"], body=policy, ok="201"),
        },
        "/v1/policies/{name}": {
            "get": _op("Read a policy", ["admin", "reader"], params=[_NAME]),
            "put": _put_policy(policy),
            "delete": _op("Delete an unassigned policy", ["admin"], params=[_NAME], ok="204"),
        },
        **_webhook_paths(),
        # issue 20: appraise each attester's stored evidence again (no new quote)
        "/v1/policies/{name}/dry-run": {
            "post": _op(
                "Which attesters would change verdict under this policy, and why (writes nothing)",
                ["admin"],
                params=[_NAME],
                body=reappraisal,
            )
        },
        "/v1/dbx/report": {
            "post": {
                **_op(
                    "Which attesters booted what a dbx update or SBAT level revokes, or run an"
                    " older dbx or SbatLevel",
                    ["admin"],
                    errors=("400", "401", "403"),
                ),
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/octet-stream": {
                            "schema": {
                                "type": "string",
                                "format": "binary",
                                "description": "EFI_VARIABLE_AUTHENTICATION_2 dbx update,"
                                " Microsoft's dbx_info JSON, an SbatLevel (text), or"
                                ' {"sbat_level", "binaries": [{name, sha256, sbat}]}',
                            }
                        }
                    },
                },
            }
        },
        "/v1/policies/{name}/apply": {
            "post": _op(
                "Assign this policy and record each new verdict as a re-appraisal",
                ["admin"],
                params=[_NAME],
                body=reappraisal,
            )
        },
        "/.well-known/jwks.json": {"get": _op("The keys that sign EAR results", None, errors=())},
        "/healthz": {"get": _op("Liveness and database reachability", None, errors=())},
        "/metrics": {"get": _op("Prometheus metrics", None, errors=())},
        "/openapi.json": {"get": _op("This document", None, errors=())},
    }
    return {
        "openapi": "3.1.0",
        "info": {"title": "vtpm-trust attestation verifier", "version": "1"},
        "paths": paths,
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "responses": {
                "Problem": {
                    "description": "RFC 9457 problem details",
                    "content": {
                        "application/problem+json": {
                            "schema": {
                                "type": "object",
                                "properties": {
                                    "type": {"type": "string"},
                                    "title": {"type": "string"},
                                    "status": {"type": "integer"},
                                    "detail": {"type": "string"},
                                },
                            }
                        }
                    },
                }
            },
        },
    }
