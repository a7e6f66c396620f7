// An independent MQTT client over WebSocket: mqtt.js under Node. Connects to tether's ws://
// port with the given protocol version, subscribes, publishes a QoS 1 message to itself and
// prints RECEIVED <topic> <payload>. Usage: node node_client.mjs PORT VERSION(4|5)
import mqtt from 'mqtt';

const [port, version] = process.argv.slice(2);
const topic = `node/${version}`;
const client = mqtt.connect(`ws://127.0.0.1:${port}/mqtt`, {
  clientId: `node-${version}`,
  protocolVersion: Number(version),
  reconnectPeriod: 0,
});
let done = false;
const timer = setTimeout(() => { console.log('TIMEOUT'); process.exit(1); }, 10000);
client.on('connect', () => {
  client.subscribe(topic, { qos: 1 }, (err) => {
    if (err) { console.log('SUBSCRIBE FAILED ' + err); process.exit(1); }
    client.publish(topic, 'hello over websocket', { qos: 1 });
  });
});
client.on('message', (t, payload) => {
  console.log(`RECEIVED ${t} ${payload.toString()}`);
  done = true;
  clearTimeout(timer);
  client.end(false, () => process.exit(0));
});
// After the message, how the socket closes is no longer the test's concern.
client.on('error', (e) => { if (!done) { console.log('ERROR ' + e.message); process.exit(1); } });
