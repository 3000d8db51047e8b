#!/usr/bin/env bash
# Checks that every .ex/.exs file of the Elixir example (consumer-example/elixir) parses:
# Code.string_to_quoted! on each, which needs no Hex package. It does not compile the project
# or resolve its dependencies (gnat, msgpax, exqlite, jason), which cannot be fetched here.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

if ! command -v elixir >/dev/null 2>&1; then
    echo "check-elixir: elixir not found: run scripts/install-deps.sh" >&2
    exit 1
fi
mapfile -t files < <(find consumer-example/elixir -type f \( -name '*.ex' -o -name '*.exs' \) | sort)
if [ ${#files[@]} -eq 0 ]; then
    echo "check-elixir: no .ex/.exs files under consumer-example/elixir" >&2
    exit 1
fi
# Each file is parsed; a syntax error names the file and line and fails the check.
elixir -e '
failed =
  Enum.count(System.argv(), fn f ->
    try do
      Code.string_to_quoted!(File.read!(f), file: f)
      false
    rescue
      e ->
        IO.puts(:stderr, "check-elixir: " <> Exception.message(e))
        true
    end
  end)

if failed > 0, do: System.halt(1)
IO.puts("check-elixir: #{length(System.argv())} files parse")
' "${files[@]}"
