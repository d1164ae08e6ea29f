// A reserved session's life, for a page: follow(token, show) opens its event stream
// (/v1/events/{token}, server-sent events) and calls show(event, text) for each event,
// with what it means to the user in words. Used by embed.html and index.html.

const REASONS = {Licenses: "waiting for a licence", Resources: "waiting for a free node",
                 Priority: "waiting for its turn", ReqNodeNotAvail: "its node is down"};

export function words(event) {
  const left = event.seconds_left, minutes = Math.ceil((left || 0) / 60);
  if (event.event === "warning") return `Ends in ${minutes} minute${minutes > 1 ? "s" : ""}`;
  if (event.event === "ended") return `Ended: ${event.end_reason}`;
  if (event.state === "queued") {
    const reason = REASONS[event.queue_reason] || event.queue_reason || "waiting";
    const at = event.expected_start &&
               new Date(event.expected_start).toLocaleTimeString([], {timeStyle: "short"});
    return `Queued: ${reason}` + (at ? `, expected at ${at}` : "");
  }
  if (event.state === "detached") return `Reconnecting: ${Math.round(left)} s left`;
  return {reserved: "Reserved", starting: "Starting", active: "Connected"}[event.state] ||
         event.state;
}

export function follow(token, show) {
  const events = new EventSource(`/v1/events/${encodeURIComponent(token)}`);
  events.onmessage = (message) => {
    const event = JSON.parse(message.data);
    if (event.event === "ended") events.close();  // else EventSource reconnects
    show(event, words(event));
  };
  return events;
}
