"""Built-in gateway profiles: where each gateway lives, which variable holds its key.

Base URLs and models are the ones each gateway publishes for itself. EvoLink
documents a primary for text (``direct.evolink.ai``) and a fallback
(``api.evolink.ai``); StarMagic documents one base URL. A user file (TOML, one
table per provider) can add or override profiles.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import UsageError
from pipeline.structured import check_mode


@dataclass(frozen=True, slots=True)
class Provider:
    name: str
    base_urls: tuple[str, ...]  # in order of preference; later ones are fallbacks
    api_key_env: str | None  # None: no key needed (the simulator)
    models: tuple[str, ...] = ()
    default_model: str | None = None
    notes: str = ""
    # How this server takes structured output, best first: "json_schema" (the default),
    # "json_object" (with the schema in response_format.schema and the system message)
    # or "prompt" (the schema in the system message only). A refusal moves on anyway.
    structured_output: str = "json_schema"
    # Whether the gateway implements OpenAI's Files and Batches APIs: True, False, or
    # None (unknown: a bare --base-url, whose owner vouches for it).
    batch_api: bool | None = None
    # The service tiers it accepts in a request's ``service_tier``: () = none (asking
    # for one is a usage error), None = unknown (passed through as asked).
    service_tiers: tuple[str, ...] | None = None


SERVICE_TIERS = ("auto", "default", "flex", "priority")


BUILTIN: dict[str, Provider] = {
    p.name: p
    for p in (
        Provider(
            "sim",
            ("http://sim.invalid/v1",),
            None,
            ("sim-1", "gpt-5.5", "gpt-5.1", "gpt-5.1-thinking"),
            "sim-1",
            "built-in simulator, in process: no key, no network",
            batch_api=True,
            service_tiers=SERVICE_TIERS,
        ),
        Provider(
            "starmagic",
            ("https://api.starmagic.ai/v1",),
            "STARMAGIC_API_KEY",
            ("gpt-5.5", "gpt-5.1", "gpt-5.1-chat", "gpt-5.1-thinking"),
            "gpt-5.5",
            "gpt-5.1-thinking returns reasoning_content",
            batch_api=False,  # documents no Batch API
            service_tiers=(),  # documents no service tiers
        ),
        Provider(
            "evolink",
            ("https://direct.evolink.ai/v1", "https://api.evolink.ai/v1"),
            "EVOLINK_API_KEY",
            ("gpt-5.5",),
            "gpt-5.5",
            "direct.evolink.ai for text, api.evolink.ai as fallback; 402 = balance",
            batch_api=False,  # documents no Batch API
            service_tiers=(),  # documents no service tiers
        ),
        Provider(
            "modelstream",
            ("https://api.modelstream.ai/v1",),
            "MODELSTREAM_API_KEY",
            ("gpt-5.5",),
            "gpt-5.5",
            "reasoning_effort up to xhigh, verbosity, image_detail, up to 10 images",
            batch_api=False,  # documents no Batch API
            service_tiers=(),  # documents no service tiers
        ),
        Provider(
            "openai",
            ("https://api.openai.com/v1",),
            "OPENAI_API_KEY",
            ("gpt-5.5", "gpt-5.1", "gpt-5", "gpt-5-mini", "gpt-5-nano", "gpt-4.1", "gpt-4o"),
            None,
            batch_api=True,
            service_tiers=SERVICE_TIERS,
        ),
    )
}


def load_providers(extra_file: Path | None = None) -> dict[str, Provider]:
    """The built-in profiles, plus (or overridden by) those in a user TOML file."""
    providers = dict(BUILTIN)
    if extra_file is None:
        return providers
    try:
        data = tomllib.loads(extra_file.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise UsageError(f"{extra_file}: cannot read provider file ({exc})") from None
    for name, table in data.items():
        if not isinstance(table, dict) or not table.get("base_url"):
            raise UsageError(f"{extra_file}: provider '{name}' needs a base_url")
        urls = table["base_url"]
        providers[name] = Provider(
            name,
            tuple(urls if isinstance(urls, list) else [urls]),
            table.get("api_key_env"),
            tuple(table.get("models", ())),
            table.get("default_model"),
            table.get("notes", ""),
            batch_api=_batch_api(extra_file, name, table.get("batch_api")),
            service_tiers=_service_tiers(extra_file, name, table.get("service_tiers")),
            structured_output=_structured_output(
                table.get("structured_output", "json_schema"), extra_file, name
            ),
        )
    return providers


def _batch_api(file: Path, name: str, value: object) -> bool | None:
    if value is None or isinstance(value, bool):
        return value
    raise UsageError(f"{file}: provider '{name}': batch_api must be true or false")


def _service_tiers(file: Path, name: str, value: object) -> tuple[str, ...] | None:
    if value is None:
        return None
    if isinstance(value, list) and all(v in SERVICE_TIERS for v in value):
        return tuple(str(v) for v in value)
    raise UsageError(
        f"{file}: provider '{name}': service_tiers must be a list of {', '.join(SERVICE_TIERS)}"
    )


def check_service_tier(provider: Provider, tier: str | None) -> None:
    """Refuse ``--service-tier`` against a gateway that says it has no such tier (exit 2).

    A profile with ``service_tiers = ()`` documents none: a tier sent there is at best
    ignored (and billed at a price nobody can check) or at worst refused for every row.
    An unknown profile (None, a bare --base-url) passes the tier through as asked.
    """
    if tier is None or provider.service_tiers is None or tier in provider.service_tiers:
        return
    if not provider.service_tiers:
        raise UsageError(
            f"--service-tier {tier}: provider '{provider.name}' documents no service tiers; "
            "drop --service-tier, or name the gateway with --base-url if it accepts them"
        )
    raise UsageError(
        f"--service-tier {tier}: provider '{provider.name}' accepts only "
        f"{', '.join(provider.service_tiers)}"
    )


def _structured_output(value: object, extra_file: Path, name: str) -> str:
    try:
        return check_mode(str(value), f"{extra_file}: provider '{name}'")
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def get_provider(name: str, providers: dict[str, Provider] | None = None) -> Provider:
    table = providers or BUILTIN
    try:
        return table[name]
    except KeyError:
        known = ", ".join(sorted(table))
        raise UsageError(f"unknown provider '{name}' (known: {known})") from None
