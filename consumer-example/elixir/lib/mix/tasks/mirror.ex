defmodule Mix.Tasks.Mirror do
  @shortdoc "Mirrors one table published by pgbridge into a SQLite file"
  @moduledoc """
  Mirrors one table published by pgbridge into a SQLite file.

      mix mirror --table users --db mirror.sqlite [--nats-host 127.0.0.1] [--nats-port 4222]

  `--table` is the table token as in subjects: `users`, or `sales.invoices` outside `public`.
  Runs until interrupted; run it again with the same `--db` to continue where it stopped.
  """
  use Mix.Task

  @switches [nats_host: :string, nats_port: :integer, table: :string, db: :string]

  @impl Mix.Task
  def run(argv) do
    {opts, _args, invalid} = OptionParser.parse(argv, strict: @switches)
    if invalid != [], do: Mix.raise("unknown or invalid options: #{inspect(invalid)}")
    unless opts[:table] && opts[:db], do: Mix.raise("--table and --db are required")

    Mix.Task.run("app.start")
    PgbridgeMirror.run(Keyword.merge([nats_host: "127.0.0.1", nats_port: 4222], opts))
  end
end
