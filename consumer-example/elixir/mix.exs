defmodule PgbridgeMirror.MixProject do
  use Mix.Project

  def project do
    [
      app: :pgbridge_mirror,
      version: "0.1.0",
      elixir: "~> 1.15",
      deps: deps()
    ]
  end

  def application do
    [extra_applications: [:logger, :crypto]]
  end

  # The versions whose documented APIs this example follows (see README.md).
  defp deps do
    [
      {:gnat, "~> 1.12.1"},
      {:msgpax, "~> 2.3"},
      {:exqlite, "~> 0.34.0"},
      {:jason, "~> 1.4"}
    ]
  end
end
