defmodule PgbridgeMirror do
  @moduledoc """
  Mirrors one table published by pgbridge into a SQLite file with the bootstrap flow of
  `consumer-example/python/mirror.py`: the schema from KV bucket `schemas`, a snapshot from
  stream `INIT`, then stream `CDC` from `cdc_stream_seq + 1`. The position is committed with
  the rows, so a restart continues where it stopped.
  """
  alias Gnat.Jetstream.API.KV
  alias PgbridgeMirror.{Pull, Store}

  @snapshot_timeout_ms 600_000

  def run(opts) do
    settings = %{host: String.to_charlist(opts[:nats_host]), port: opts[:nats_port]}
    {:ok, conn} = Gnat.start_link(settings)
    store = Store.open(opts[:db], opts[:table])
    store = Store.apply_schema(store, schema(conn, store.table))
    follow(conn, if(Store.position(store), do: store, else: snapshot(conn, store)))
  end

  # MessagePack, the bridge's default format; bytea arrives as %Msgpax.Bin{}.
  defp decode(body), do: Msgpax.unpack!(body, binary: true, nonfinite_floats: true)

  @doc "PostgreSQL's `X/Y` LSN text as a number, so that LSNs compare correctly."
  def parse_lsn(text) do
    [high, low] = String.split(text, "/")
    String.to_integer(high, 16) * 0x1_0000_0000 + String.to_integer(low, 16)
  end

  # The table's entry in bucket `schemas` (key: the table token, `%` written as `=`).
  defp schema(conn, table, tries \\ 120) do
    case KV.get_value(conn, "schemas", String.replace(table, "%", "=")) do
      value when is_binary(value) and value != "" ->
        decode(value)

      _missing when tries > 0 ->
        Process.sleep(500)
        schema(conn, table, tries - 1)

      other ->
        raise "no schema for #{table} in bucket schemas: #{inspect(other)}"
    end
  end

  # A column the mirror lacks means that the table was altered: read its schema again first.
  defp upsert(conn, store, row) do
    if Enum.all?(Map.keys(row), &(&1 in store.columns)),
      do: Store.upsert(store, row),
      else: store |> Store.apply_schema(schema(conn, store.table)) |> Store.upsert(row)
  end

  ## Snapshot

  defp snapshot(conn, store) do
    # Listen before asking, so that the meta message cannot be missed.
    {:ok, metas} = Pull.start(conn, "INIT", "init.meta.#{store.table}", deliver_policy: :new)
    id = request_snapshot(conn, store.table)
    log("snapshot #{id} requested")
    meta = wait_meta(metas, id, System.monotonic_time(:millisecond) + @snapshot_timeout_ms)
    Pull.stop(metas)
    if meta["error"], do: raise("snapshot #{id} failed: #{meta["error"]}")

    filter = "init.snap.#{store.table}.#{id}.*"
    {:ok, chunks} = Pull.start(conn, "INIT", filter, deliver_policy: :all)

    store =
      Store.transaction(store, fn ->
        store = load_chunks(conn, Store.clear(store), chunks, 0, meta["batch_count"])
        Store.save_position(store, id, meta["lsn"], meta["cdc_stream_seq"])
      end)

    Pull.stop(chunks)
    log("snapshot #{id}: #{meta["row_count"]} rows at #{meta["lsn"]}")
    store
  end

  defp request_snapshot(conn, table) do
    case Gnat.request(conn, "snapshot.request.#{table}", "", receive_timeout: 10_000) do
      {:ok, %{body: body}} ->
        case Jason.decode!(body) do
          %{"status" => "accepted", "snapshot_id" => id} ->
            id

          %{"error" => error} = answer ->
            # in progress, just taken (cooldown) or busy: ask again later
            unless answer["reason"] in ["in_progress", "cooldown", "busy"],
              do: raise("snapshot refused: #{error}")

            Process.sleep(1_000)
            request_snapshot(conn, table)
        end

      {:error, reason} ->
        raise "snapshot request for #{table} failed: #{inspect(reason)}"
    end
  end

  defp wait_meta(metas, id, deadline) do
    if System.monotonic_time(:millisecond) > deadline,
      do: raise("snapshot #{id} did not finish in time (the bridge's log says why)")

    Enum.find_value(Pull.fetch(metas, 10, 1_000), fn message ->
      meta = decode(message.body)
      if meta["snapshot_id"] == id, do: meta
    end) || wait_meta(metas, id, deadline)
  end

  defp load_chunks(_conn, store, _chunks, count, count), do: store

  defp load_chunks(conn, store, chunks, next, count) do
    case Pull.fetch(chunks, 1, 5_000) do
      [message] ->
        chunk = decode(message.body)
        if chunk["chunk"] != next, do: raise("chunk #{chunk["chunk"]} came, #{next} was due")
        store = Enum.reduce(chunk["data"], store, &upsert(conn, &2, Store.row(&1)))
        load_chunks(conn, store, chunks, next + 1, count)

      [] ->
        raise "snapshot chunk #{next} of #{count} did not arrive"
    end
  end

  ## Changes

  defp follow(conn, store) do
    {_id, lsn, last_seq} = Store.position(store)
    {:ok, %{state: state}} = Gnat.Jetstream.API.Stream.info(conn, "CDC")

    if state.first_seq <= last_seq + 1 and last_seq <= state.last_seq do
      deliver = [deliver_policy: :by_start_sequence, opt_start_seq: last_seq + 1]
      {:ok, changes} = Pull.start(conn, "CDC", "cdc.#{store.table}.*", deliver)
      consume(conn, store, changes, parse_lsn(lsn))
    else
      log("the CDC stream no longer holds sequence #{last_seq + 1}")
      follow(conn, snapshot(conn, store))
    end
  end

  # Each batch of changes is applied in one transaction together with its last sequence.
  defp consume(conn, store, changes, lsn) do
    case Pull.fetch(changes, 100, 1_000) do
      [] ->
        consume(conn, store, changes, lsn)

      messages ->
        store =
          Store.transaction(store, fn ->
            Enum.reduce(messages, store, fn message, store ->
              event = decode(message.body)
              newer? = parse_lsn(event["commit_lsn"]) >= lsn
              store = if newer?, do: apply_change(conn, store, event), else: store
              Store.set_last_seq(store, Pull.stream_seq(message))
            end)
          end)

        consume(conn, store, changes, lsn)
    end
  end

  defp apply_change(_conn, store, %{"operation" => "TRUNCATE"}), do: Store.clear(store)

  defp apply_change(conn, store, event) do
    # Columns listed in unchanged_toast are absent from `columns`: the upsert keeps them.
    row = Store.row(event["columns"])
    key = Enum.map(store.key, &row[&1])

    if event["operation"] == "DELETE" do
      Store.delete(store, key)
    else
      old = Store.row(event["old_columns"])
      old_key = Enum.map(store.key, &old[&1])
      store = if old != %{} and old_key != key, do: Store.move(store, old_key, key), else: store
      upsert(conn, store, row)
    end
  end

  defp log(text), do: IO.puts(:stderr, "mirror: " <> text)
end
