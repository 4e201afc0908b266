"""Runtime policies for IMA lists: `vtpm ima learn`, `vtpm ima policy convert|show` (issue 14).

The ``ima`` group is shared with the list commands (``vtpm ima show``,
``vtpm ima replay``): whichever module registers first creates it, the
other adds its commands to it.

Exit status: 0 success; 1 a check failed; 2 unreadable input or a bad
command line (the root group maps ParseError/ConfigError).
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from verifier.ima.entries import ImaEntry
from verifier.ima.keylime import DEFAULT_ALGORITHMS, load_keylime, to_keylime
from verifier.ima.learn import (
    Learned,
    build_policy,
    learn_from_debs,
    learn_from_entries,
    learn_from_tree,
)
from verifier.ima.limits import DEFAULT_IMA_LIMITS
from verifier.ima.parse import parse_list
from verifier.ima.policy import RuntimePolicy, ViolationMode
from verifier.ima.signature import TrustedKey
from vtpm_core.errors import ConfigError, ParseError, VerificationError

_FILE = click.Path(exists=True, dir_okay=False, path_type=Path)
_DIR = click.Path(exists=True, file_okay=False, path_type=Path)
_OUT = click.Path(dir_okay=False, path_type=Path)


def read_list(path: Path) -> tuple[ImaEntry, ...]:
    """A measurement list file, read up to the parser's size limit (binary or ASCII).

    Errors name the file: ParseError (malformed), VerificationError (a forged entry).
    """
    limit = DEFAULT_IMA_LIMITS.max_list_bytes
    with path.open("rb") as fh:
        data = fh.read(limit + 1)
    if len(data) > limit:
        raise ParseError("ima_list", "list", limit, f"{path} is larger than the {limit}-byte limit")
    try:
        return tuple(parse_list(data))
    except ParseError as exc:
        raise ParseError(exc.structure, exc.field, exc.offset, f"{exc.message} in {path}") from None
    except VerificationError as exc:
        raise VerificationError(exc.check, f"{exc.message} in {path}") from None


def ima_group(cli: click.Group) -> click.Group:
    """The ``ima`` group of ``cli``, created here if no other module made it yet."""
    existing = cli.commands.get("ima")
    if isinstance(existing, click.Group):
        return existing

    @cli.group("ima")
    def ima() -> None:
        """IMA measurement lists and runtime policies (PCR 10)."""

    return ima


def _notes(notes: tuple[str, ...]) -> None:
    for note in notes:
        click.echo(f"note: {note}", err=True)


def register(cli: click.Group) -> None:
    """Add this module's commands to the root ``vtpm`` group (under ``ima``)."""
    ima = ima_group(cli)

    @ima.command("learn")
    @click.option(
        "--list",
        "lists",
        type=_FILE,
        multiple=True,
        help="A known-good VM's IMA measurement list (binary or ASCII; e.g. the ima.bin "
        "of `vtpm vm boot --ima`): allow what it measured.",
    )
    @click.option(
        "--tree",
        "trees",
        type=_DIR,
        multiple=True,
        help="A known-good root file system (or part of one): hash every regular file.",
    )
    @click.option(
        "--deb",
        "debs",
        type=_FILE,
        multiple=True,
        help="A Debian package (.deb): hash every file it installs.",
    )
    @click.option(
        "-o", "--output", type=_OUT, required=True, help="Where to write the policy (JSON)."
    )
    @click.option(
        "--base",
        type=_FILE,
        default=None,
        help="Add to this runtime policy (keeps its digests: old and new versions).",
    )
    @click.option("--name", default=None, help="A name for the policy (part of its id).")
    @click.option(
        "--algo",
        default="sha256",
        show_default=True,
        help="Digest algorithm, as the guest's ima_hash= (sha256, sha384, sha512, sha1).",
    )
    @click.option(
        "--prefix",
        default="/",
        show_default=True,
        help="Where --tree is mounted in the guest (paths are recorded under it).",
    )
    @click.option(
        "--skip",
        "skip_dirs",
        multiple=True,
        metavar="DIR",
        help="A guest directory not to hash (repeatable), e.g. /var/log.",
    )
    @click.option(
        "--exclude",
        "excludes",
        multiple=True,
        metavar="REGEX",
        help="An exclude pattern to add (re.match on the path; repeatable).",
    )
    @click.option(
        "--signing-key",
        "keys",
        type=_FILE,
        multiple=True,
        help="Trust this IMA signing key (X.509 certificate or public key; repeatable).",
    )
    @click.option(
        "--violations",
        type=click.Choice([v.value for v in ViolationMode]),
        default=None,
        help="What violation entries do (default: fail, or the base's).",
    )
    @click.option("--modules-by-path", is_flag=True,
                  help="Record kernel modules by path, not by digest on any path.")  # fmt: skip
    def learn(
        lists: tuple[Path, ...],
        trees: tuple[Path, ...],
        debs: tuple[Path, ...],
        output: Path,
        base: Path | None,
        name: str | None,
        algo: str,
        prefix: str,
        skip_dirs: tuple[str, ...],
        excludes: tuple[str, ...],
        keys: tuple[Path, ...],
        violations: str | None,
        modules_by_path: bool,
    ) -> None:
        """Write a runtime policy allowing the files of known-good sources.

        Give one or more --list, --tree and --deb sources. From a list, every
        measured file, module and buffer is allowed as measured (template
        hashes checked; boot_aggregate and violations are left out). From a
        tree or a package, every regular file is hashed under its path in the
        guest; symbolic links are not followed
        (IMA records the file itself). Kernel modules are allowed by digest
        on any module path unless --modules-by-path.
        """
        if not (lists or trees or debs):
            raise ConfigError("give at least one source: --list FILE, --tree DIR or --deb FILE")
        learned = Learned()
        by_digest = not modules_by_path
        for listed in lists:
            # a forged entry (template hash) is a VerificationError: exit 1, nothing written
            entries = read_list(listed)
            learn_from_entries(entries, into=learned, modules_by_digest=by_digest)
        for tree in trees:
            learn_from_tree(tree, algo=algo, prefix=prefix, skip_dirs=skip_dirs, into=learned,
                            modules_by_digest=by_digest)  # fmt: skip
        if debs:
            learn_from_debs(debs, algo=algo, into=learned, modules_by_digest=by_digest)
        trusted = []
        for key in keys:
            try:
                trusted.append(TrustedKey.load(key.read_bytes()))
            except ConfigError as exc:
                raise ConfigError(f"{key}: {exc}") from None
        policy = build_policy(
            learned,
            base=RuntimePolicy.load(base) if base is not None else None,
            name=name,
            excludes=excludes,
            signing_keys=trusted,
            violations=ViolationMode(violations) if violations else None,
        )
        policy.save(output)
        click.echo(f"learned {learned.summary()}")
        click.echo(f"wrote {output} ({policy.id})")

    @ima.group("policy")
    def policy() -> None:
        """Runtime policies: convert to and from Keylime, show."""

    @policy.command("convert")
    @click.argument("source", metavar="POLICY", type=_FILE)
    @click.option(
        "--from",
        "from_format",
        type=click.Choice(["keylime", "vtpm"]),
        required=True,
        help="The format of POLICY; the output is the other one.",
    )
    @click.option("-o", "--output", type=_OUT, required=True, help="Where to write the result.")
    @click.option("--name", default=None, help="Name for the imported policy (--from keylime).")
    @click.option("--sm3", is_flag=True,
                  help="Read 64-hex-digit Keylime digests as sm3, not sha256.")  # fmt: skip
    def convert(source: Path, from_format: str, output: Path, name: str | None, sm3: bool) -> None:
        """Convert a runtime policy between Keylime's JSON and ours.

        --from keylime reads a Keylime runtime policy (as `keylime-policy
        create runtime` writes it) and writes ours; --from vtpm writes
        Keylime's. What the other format cannot express is printed as a
        note; a conversion never allows more than its source.
        """
        if output.exists() and output.resolve() == source.resolve():
            raise ConfigError("the output would overwrite the input")
        if from_format == "keylime":
            algorithms = dict(DEFAULT_ALGORITHMS)
            if sm3:
                algorithms[64] = "sm3"
            imported = load_keylime(source, name=name, algorithms=algorithms)
            _notes(imported.notes)
            imported.policy.save(output)
            click.echo(f"wrote {output} ({imported.policy.id})")
        else:
            if name is not None or sm3:
                raise ConfigError("--name and --sm3 apply to --from keylime")
            exported = to_keylime(RuntimePolicy.load(source))
            _notes(exported.notes)
            output.write_text(exported.to_json())
            click.echo(f"wrote {output} (Keylime runtime policy)")

    @policy.command("show")
    @click.argument("source", metavar="POLICY", type=_FILE)
    @click.option("--json", "as_json", is_flag=True, help="Print the canonical policy document.")
    def show(source: Path, as_json: bool) -> None:
        """Check a runtime policy (ours) and summarise it."""
        pol = RuntimePolicy.load(source)
        if as_json:
            click.echo(json.dumps(pol.to_dict(), indent=2))
            return
        click.echo(pol.id)
        click.echo(f"  paths: {len(pol.digests)} ({pol.digest_count} digests)")
        click.echo(f"  kernel modules: {len(pol.kernel_modules)} digests")
        click.echo(f"  excludes: {len(pol.excludes)}")
        for pattern in pol.excludes.patterns:
            click.echo(f"    {pattern}")
        click.echo(f"  keyrings: {', '.join(sorted(pol.keyrings)) or '-'}")
        if pol.ignored_keyrings:
            click.echo(f"  ignored keyrings: {', '.join(sorted(pol.ignored_keyrings))}")
        click.echo(f"  ima-buf: {', '.join(sorted(pol.ima_buf)) or '-'}")
        for key in pol.signing_keys.keys:
            label = f" {key.name}" if key.name else ""
            click.echo(f"  signing key {key.keyid.hex()}{label}")
        click.echo(f"  violations: {pol.violations.value}")
