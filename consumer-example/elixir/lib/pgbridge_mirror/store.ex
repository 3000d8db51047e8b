defmodule PgbridgeMirror.Store do
  @moduledoc """
  The SQLite side: the mirrored table, its columns and primary key, and the position in table
  `_mirror_state` (the layout of the Python reference consumer). Writers return the store.
  """
  alias Exqlite.Sqlite3

  defstruct [:db, :table, :qtable, columns: MapSet.new(), key: []]

  def open(path, table) do
    {:ok, db} = Sqlite3.open(path)
    store = %__MODULE__{db: db, table: table, qtable: quote_name(table)}
    :ok = Sqlite3.execute(db, "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL")

    exec(store, "CREATE TABLE IF NOT EXISTS _mirror_state (table_token TEXT PRIMARY KEY, " <>
      "snapshot_id TEXT NOT NULL, lsn TEXT NOT NULL, last_seq INTEGER NOT NULL)")
  end

  @doc "Creates the table from a `schemas` entry, or adds the columns it lacks."
  def apply_schema(store, %{"primary_key" => key, "columns" => columns}) do
    if key == [], do: raise("#{store.table}: the table has no primary key, cannot mirror it")
    existing = Enum.map(table_info(store), &Enum.at(&1, 1))
    columns = Enum.sort_by(columns, & &1["position"])

    if existing == [] do
      defs = Enum.map(columns, &column_def/1) ++ ["PRIMARY KEY (#{quoted_list(key)})"]
      exec(store, "CREATE TABLE #{store.qtable} (#{Enum.join(defs, ", ")})")
    else
      for c <- columns, c["name"] not in existing,
          do: exec(store, "ALTER TABLE #{store.qtable} ADD COLUMN #{column_def(c)}")
    end

    # PRAGMA table_info rows: [cid, name, type, notnull, default, pk position]
    info = table_info(store)
    pk = info |> Enum.filter(&(List.last(&1) > 0)) |> Enum.sort_by(&List.last/1)
    %{store | columns: MapSet.new(info, &Enum.at(&1, 1)), key: Enum.map(pk, &Enum.at(&1, 1))}
  end

  # BOOLEAN (numeric affinity) and JSON_TEXT (text affinity, for arrays) only name the content.
  @types %{"smallint" => "INTEGER", "integer" => "INTEGER", "bigint" => "INTEGER",
    "oid" => "INTEGER", "real" => "REAL", "double precision" => "REAL", "boolean" => "BOOLEAN",
    "bytea" => "BLOB"}

  defp column_def(%{"name" => name, "data_type" => type}) do
    type = if String.ends_with?(type, "]"), do: "JSON_TEXT", else: Map.get(@types, type, "TEXT")
    quote_name(name) <> " " <> type
  end

  defp table_info(store), do: query(store, "PRAGMA table_info(#{store.qtable})")

  @doc "{snapshot_id, lsn text, last_seq}, or nil before the first snapshot."
  def position(store) do
    sql = "SELECT snapshot_id, lsn, last_seq FROM _mirror_state WHERE table_token = ?"

    case query(store, sql, [store.table]) do
      [[id, lsn, last_seq]] -> {id, lsn, last_seq}
      [] -> nil
    end
  end

  def save_position(store, snapshot_id, lsn, last_seq) do
    exec(store, "INSERT INTO _mirror_state VALUES (?, ?, ?, ?) ON CONFLICT (table_token) " <>
      "DO UPDATE SET snapshot_id = excluded.snapshot_id, lsn = excluded.lsn, " <>
      "last_seq = excluded.last_seq", [store.table, snapshot_id, lsn, last_seq])
  end

  def set_last_seq(store, seq) do
    exec(store, "UPDATE _mirror_state SET last_seq = ? WHERE table_token = ?", [seq, store.table])
  end

  def clear(store), do: exec(store, "DELETE FROM #{store.qtable}")

  @doc "Inserts the row, or updates only the given columns of the row with its key."
  def upsert(store, row) do
    names = Map.keys(row)
    marks = Enum.map_join(names, ", ", fn _ -> "?" end)

    action =
      case names -- store.key do
        [] -> "DO NOTHING"
        rest -> "DO UPDATE SET " <> Enum.map_join(rest, ", ", &set_excluded/1)
      end

    exec(store, "INSERT INTO #{store.qtable} (#{quoted_list(names)}) VALUES (#{marks}) " <>
      "ON CONFLICT (#{quoted_list(store.key)}) #{action}", Enum.map(names, &row[&1]))
  end

  def delete(store, key), do: exec(store, "DELETE FROM #{store.qtable} WHERE #{where(store)}", key)

  @doc "Gives the row at `old` the key `new`; nothing when there is no row at `old` (replay)."
  def move(store, old, new) do
    if query(store, "SELECT 1 FROM #{store.qtable} WHERE #{where(store)}", old) == [] do
      store
    else
      sets = Enum.map_join(store.key, ", ", &"#{quote_name(&1)} = ?")
      delete(store, new)
      exec(store, "UPDATE #{store.qtable} SET #{sets} WHERE #{where(store)}", new ++ old)
    end
  end

  defp set_excluded(name), do: "#{quote_name(name)} = excluded.#{quote_name(name)}"

  defp where(store), do: Enum.map_join(store.key, " AND ", &"#{quote_name(&1)} IS ?")

  @doc "Runs `fun` in one SQLite transaction and returns its result."
  def transaction(store, fun) do
    :ok = Sqlite3.execute(store.db, "BEGIN")

    try do
      result = fun.()
      :ok = Sqlite3.execute(store.db, "COMMIT")
      result
    rescue
      e ->
        Sqlite3.execute(store.db, "ROLLBACK")
        reraise e, __STACKTRACE__
    end
  end

  @doc "A snapshot row `%{column => value}` or a change's `[{name, value}]` as SQLite values."
  def row(nil), do: %{}
  def row(pairs) when is_list(pairs), do: row(Map.new(pairs, &{&1["name"], &1["value"]}))
  def row(values), do: Map.new(values, fn {name, v} -> {name, value(v)} end)

  defp value(%Msgpax.Bin{data: bytes}), do: {:blob, bytes}
  defp value(true), do: 1
  defp value(false), do: 0
  defp value(list) when is_list(list), do: Jason.encode!(Enum.map(list, &plain/1))
  defp value(other), do: plain(other)

  # NaN and ±Infinity become text: the BEAM has no such floats (and SQLite stores NaN as NULL).
  defp plain(Msgpax.NaN), do: "NaN"
  defp plain(Msgpax.Infinity), do: "Infinity"
  defp plain(Msgpax.NegInfinity), do: "-Infinity"
  defp plain(%Msgpax.Bin{data: bytes}), do: Base.encode64(bytes)
  defp plain(other), do: other

  defp exec(store, sql, args \\ []) do
    query(store, sql, args)
    store
  end

  defp query(store, sql, args \\ []) do
    {:ok, stmt} = Sqlite3.prepare(store.db, sql)
    :ok = Sqlite3.bind(stmt, args)
    {:ok, rows} = Sqlite3.fetch_all(store.db, stmt)
    :ok = Sqlite3.release(store.db, stmt)
    rows
  end

  defp quoted_list(names), do: Enum.map_join(names, ", ", &quote_name/1)

  defp quote_name(name), do: ~s(") <> String.replace(name, ~s("), ~s("")) <> ~s(")
end
