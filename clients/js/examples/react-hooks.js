// React hooks over the tidings client: an example to copy, not a dependency (this file
// imports React from the application). One client per page, shared by every hook.
//
//   const gateway = new Tidings('https://gw.example', { getToken });
//   function RunView({ runId }) {
//     const { events, done } = useTopic(gateway, `runs:${runId}`);
//     return <Timeline events={events} done={done} />;
//   }
//   function Settings() {
//     const [config, version] = useStateDoc(gateway, 'cfg:prod');
//     return <Form value={config} version={version} />;
//   }
import { useEffect, useState, useSyncExternalStore } from 'react';

/**
 * Seed 002's hook without its pitfalls: every event once and in order across reconnects
 * (the client resumes with `since`), WebSocket then SSE then long-polling chosen by the
 * client when one fails or goes silent, and nothing polled once the topic is `closed`.
 */
export function useTopic(client, topic, { filter, max = 500 } = {}) {
  const [state, setState] = useState({ events: [], done: false });
  useEffect(() => {
    setState({ events: [], done: false });
    const sub = client.subscribe(
      topic,
      (msg) => {
        if (msg.type === 'event') setState((s) => ({ ...s, events: [...s.events.slice(-(max - 1)), msg] }));
        if (msg.type === 'closed') setState((s) => ({ ...s, done: true }));
      },
      { filter },
    );
    return () => sub.unsubscribe();
  }, [client, topic, JSON.stringify(filter), max]);
  return state;
}

/** A state document and its version, kept by the client's snapshot-then-patches rule. */
export function useStateDoc(client, topic) {
  const [value, setValue] = useState([undefined, null]);
  useEffect(() => {
    const sub = client.state(topic, (doc, version) => setValue([doc, version]));
    return () => sub.unsubscribe();
  }, [client, topic]);
  return value;
}

/** Seed 004's connection banner: `open`, `waiting` (backing off), `connecting`, `idle`. */
export function useConnection(client) {
  const status = useSyncExternalStore(
    (notify) => client.on('status', notify),
    () => client.status,
  );
  return { status, transport: client.transportName };
}
