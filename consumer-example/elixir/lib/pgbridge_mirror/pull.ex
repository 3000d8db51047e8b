defmodule PgbridgeMirror.Pull do
  @moduledoc """
  A short-lived ephemeral pull consumer on one stream and subject filter, read in stream
  order. The mirror keeps its position in SQLite, so a consumer is never reused.
  """
  alias Gnat.Jetstream.API.Consumer

  defstruct [:conn, :stream, :name, :inbox, :sid]

  @doc "Creates the consumer; `deliver` is e.g. `[deliver_policy: :new]`."
  def start(conn, stream, filter, deliver) do
    # The server removes the consumer a minute after the last pull.
    settings = [stream_name: stream, filter_subject: filter, ack_policy: :all]
    consumer = struct!(Consumer, settings ++ [inactive_threshold: 60_000_000_000] ++ deliver)
    inbox = "_INBOX.mirror." <> Base.encode16(:crypto.strong_rand_bytes(8))

    with {:ok, info} <- Consumer.create(conn, consumer),
         {:ok, sid} <- Gnat.sub(conn, self(), inbox) do
      {:ok, %__MODULE__{conn: conn, stream: stream, name: info.name, inbox: inbox, sid: sid}}
    end
  end

  @doc "Up to `batch` messages; waits at most `wait_ms` when there are none."
  def fetch(%__MODULE__{} = p, batch, wait_ms) do
    opts = [batch: batch, expires: wait_ms * 1_000_000]
    :ok = Consumer.request_next_message(p.conn, p.stream, p.name, p.inbox, nil, opts)
    messages = collect(p.sid, batch, [], wait_ms + 2_000)
    # ack_policy :all: acknowledging the last message acknowledges the batch
    if messages != [], do: :ok = Gnat.Jetstream.ack(List.last(messages))
    messages
  end

  # Stream messages carry no status; a status (404, 408, 409) ends the pull request.
  defp collect(_sid, 0, acc, _timeout), do: Enum.reverse(acc)

  defp collect(sid, left, acc, timeout) do
    receive do
      {:msg, %{sid: ^sid} = message} ->
        case Map.get(message, :status) do
          nil -> collect(sid, left - 1, [message | acc], timeout)
          "100" -> collect(sid, left, acc, timeout)
          _end_of_pull -> Enum.reverse(acc)
        end
    after
      timeout -> Enum.reverse(acc)
    end
  end

  def stop(%__MODULE__{} = p) do
    Gnat.unsub(p.conn, p.sid)
    Consumer.delete(p.conn, p.stream, p.name)
  end

  @doc """
  A message's stream sequence, from its reply subject `$JS.ACK.<stream>.<consumer>.<delivered>.
  <stream seq>.<consumer seq>.<time>.<pending>` (with a domain, two tokens come first).
  """
  def stream_seq(%{reply_to: "$JS.ACK." <> tokens}) do
    case String.split(tokens, ".") do
      [_stream, _consumer, _delivered, seq, _cseq, _time, _pending] -> String.to_integer(seq)
      [_domain, _account, _stream, _consumer, _delivered, seq | _] -> String.to_integer(seq)
    end
  end
end
