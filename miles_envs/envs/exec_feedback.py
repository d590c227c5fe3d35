"""How a sandbox run reads to the model, shared by the code-execution env families."""

from __future__ import annotations

from miles_envs.sandbox import ExecResult


def format_exec_result(result: ExecResult) -> str:
    """What the model sees after running code: output first, then what went wrong, if anything."""
    parts = [result.stdout]
    if result.stderr:
        parts.append(result.stderr if not result.stdout else f"[stderr]\n{result.stderr}")
    notes = {
        "sandbox_error": f"[sandbox error: {result.error}]",
        "timeout": "[timed out: the run was killed]",
        "oom": "[memory limit reached: the run was killed]",
        "killed": f"[killed by signal {-result.exit_code}]",
        "error": f"[exit code {result.exit_code}]",
    }
    if result.status in notes:
        parts.append(notes[result.status])
    if result.output_truncated:
        parts.append("[output truncated]")
    text = "\n".join(part.rstrip("\n") for part in parts if part)
    return text or "(no output)"
