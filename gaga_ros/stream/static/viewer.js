// gaga_ros avatar viewer: one WebRTC connection (avatar down, optional webcam up, "expression"
// data channel), automatic reconnect, stats overlay, kiosk mode, frame-code latency probe.
'use strict';

const params = new URLSearchParams(location.search);
const flag = (name) => params.has(name) && params.get(name) !== '0';
const kiosk = flag('kiosk') || location.pathname.replace(/\/+$/, '').endsWith('/kiosk');
const token = params.get('token');
const authHeaders = token ? { Authorization: 'Bearer ' + token } : {};
const $ = (id) => document.getElementById(id);
const video = $('video');

// Everything a test, bench or operator script may read (Runtime.evaluate / the console).
const gaga = window.gaga = {
  state: 'new', connects: 0, frames: 0, codes: [], stats: {}, errors: [],
  upstream: flag('upstream'), wanted: true,
};

let pc = null;
let channel = null;
let pendingReplies = [];
let config = { iceServers: [], idleAfterS: 3, codec: null };
let retryMs = 500;
let retryTimer = null;
let connectingSince = 0;
let lastFrameAt = 0;

if (kiosk) document.body.classList.add('kiosk');
if (kiosk || params.get('stats') === '0') $('stats').classList.add('hidden');
$('upstream').checked = gaga.upstream;

function setStatus(text) {
  gaga.state = text;
  $('status').textContent = text;
}

async function fetchJson(path, options = {}) {
  const headers = { ...authHeaders, ...(options.headers || {}) };
  // POSTs send back the CSRF token /config handed out: only pages this server served may change state.
  if (options.method === 'POST') headers['X-CSRF-Token'] = config.csrf;
  const res = await fetch(path, { ...options, headers });
  if (!res.ok) throw new Error(path + ': HTTP ' + res.status + ' ' + (await res.text()));
  return res.json();
}

function waitIceGathering(peer, timeoutMs) {
  // aiortc does not trickle candidates: send the offer once gathering finished (or timed out).
  if (peer.iceGatheringState === 'complete') return Promise.resolve();
  return new Promise((resolve) => {
    const done = () => { if (peer.iceGatheringState === 'complete') resolve(); };
    peer.addEventListener('icegatheringstatechange', done);
    setTimeout(resolve, timeoutMs);
  });
}

async function connect() {
  clearTimeout(retryTimer);
  teardown();
  if (!gaga.wanted) return;
  setStatus('connecting');
  connectingSince = performance.now();
  try {
    config = await fetchJson('/config');
    const peer = pc = new RTCPeerConnection({ iceServers: config.iceServers });
    peer.addTransceiver('video', { direction: 'recvonly' });
    if (gaga.upstream) {
      const cam = await navigator.mediaDevices.getUserMedia({ video: { width: 640, height: 480 } });
      peer.addTransceiver(cam.getVideoTracks()[0], { direction: 'sendonly', streams: [cam] });
    }
    channel = peer.createDataChannel('expression');
    channel.onmessage = (e) => { const r = pendingReplies.shift(); if (r) r(JSON.parse(e.data)); };
    channel.onclose = () => { if (peer === pc) scheduleReconnect('data channel closed'); };
    peer.ontrack = (e) => {
      if ('jitterBufferTarget' in e.receiver) e.receiver.jitterBufferTarget = 0;
      if ('playoutDelayHint' in e.receiver) e.receiver.playoutDelayHint = 0;
      video.srcObject = new MediaStream([e.track]);
      video.play().catch(() => {});
    };
    peer.onconnectionstatechange = () => {
      if (peer !== pc) return;
      const st = peer.connectionState;
      if (st === 'connected') { setStatus('connected'); retryMs = 500; gaga.connects += 1; }
      else if (st === 'failed' || st === 'closed') scheduleReconnect('connection ' + st);
      else setStatus(st);
    };
    await peer.setLocalDescription(await peer.createOffer());
    await waitIceGathering(peer, 2000);
    const body = { sdp: peer.localDescription.sdp, type: peer.localDescription.type };
    if (params.get('codec')) body.codec = params.get('codec');
    const answer = await fetchJson('/offer', {
      method: 'POST', headers: { 'Content-Type': 'application/json' }, body: JSON.stringify(body),
    });
    gaga.clientId = answer.id;
    if (peer === pc) await peer.setRemoteDescription(answer);
  } catch (err) {
    gaga.errors.push(String(err));
    scheduleReconnect(String(err.message || err));
  }
}

function teardown() {
  if (pc) { const old = pc; pc = null; old.getSenders().forEach((s) => s.track && s.track.stop()); old.close(); }
  channel = null;
  pendingReplies.forEach((r) => r({ ok: false, error: 'disconnected' }));
  pendingReplies = [];
}

function scheduleReconnect(why) {
  teardown();
  if (!gaga.wanted) { setStatus('disconnected'); return; }
  setStatus('reconnecting (' + why + ')');
  clearTimeout(retryTimer);
  retryTimer = setTimeout(connect, retryMs);
  retryMs = Math.min(retryMs * 2, 5000);
}

// Frame-code reader: the layout of gaga_ros.stream.tracks.stamp_code (16 bits, inverted check row).
const codeCanvas = document.createElement('canvas');
const codeCtx = codeCanvas.getContext('2d', { willReadFrequently: true });

function readCode() {
  const w = video.videoWidth;
  const b = Math.max(2, Math.floor(w / 32));
  if (!w || 2 * b > video.videoHeight) return null;
  codeCanvas.width = 16 * b;
  codeCanvas.height = 2 * b;
  codeCtx.drawImage(video, 0, 0, 16 * b, 2 * b, 0, 0, 16 * b, 2 * b);
  const px = codeCtx.getImageData(0, 0, 16 * b, 2 * b).data;
  const lo = Math.floor(b / 4);
  const hi = b - lo;
  const mean = (x0, y0) => {
    let sum = 0;
    let n = 0;
    for (let y = y0 + lo; y < y0 + hi; y++) {
      for (let x = x0 + lo; x < x0 + hi; x++) {
        const i = 4 * (y * 16 * b + x);
        sum += px[i] + px[i + 1] + px[i + 2];
        n += 3;
      }
    }
    return sum / n;
  };
  let value = 0;
  for (let i = 0; i < 16; i++) {
    const top = mean(i * b, 0) > 128;
    if (top === (mean(i * b, b) > 128)) return null;
    value = (value << 1) | (top ? 1 : 0);
  }
  return value;
}

// Mean RGB of the current picture, for tests that check content rather than the code.
gaga.meanColor = () => {
  const c = document.createElement('canvas');
  c.width = video.videoWidth;
  c.height = video.videoHeight;
  if (!c.width) return null;
  const ctx = c.getContext('2d', { willReadFrequently: true });
  ctx.drawImage(video, 0, 0);
  const d = ctx.getImageData(0, 0, c.width, c.height).data;
  const sum = [0, 0, 0];
  for (let i = 0; i < d.length; i += 4) { sum[0] += d[i]; sum[1] += d[i + 1]; sum[2] += d[i + 2]; }
  return sum.map((v) => v / (d.length / 4));
};

let lastCode = null;
function onFrame(now, meta) {
  lastFrameAt = performance.now();
  gaga.frames += 1;
  if (flag('codes')) {
    const code = readCode();
    // Wall-clock time the frame was handed to the compositor (same clock as Python's time.time()).
    const shown = performance.timeOrigin + (meta.presentationTime || now);
    // drawImage reads the picture showing now, which on a busy machine can already be the next
    // frame: the following callback then reads the same picture again. Keep each picture once.
    if (code !== null && code !== lastCode) gaga.codes.push([code, shown]);
    if (code !== null) lastCode = code;
    if (gaga.codes.length > 5000) gaga.codes.splice(0, 1000);
  }
  video.requestVideoFrameCallback(onFrame);
}
video.requestVideoFrameCallback(onFrame);

// Sends one expression over the data channel; resolves to the server's {ok, error} reply.
gaga.sendExpression = (obj) => new Promise((resolve) => {
  if (!channel || channel.readyState !== 'open') { resolve({ ok: false, error: 'not connected' }); return; }
  pendingReplies.push(resolve);
  channel.send(typeof obj === 'string' ? obj : JSON.stringify(obj));
});

let lastBytes = null;
async function pollStats() {
  if (!pc) return;
  const report = await pc.getStats();
  const out = {};
  report.forEach((r) => {
    if (r.type === 'inbound-rtp' && r.kind === 'video') {
      out.fps = r.framesPerSecond || 0;
      out.framesDecoded = r.framesDecoded || 0;
      out.framesDropped = r.framesDropped || 0;
      out.size = (r.frameWidth || 0) + 'x' + (r.frameHeight || 0);
      out.jitterBufferMs = r.jitterBufferEmittedCount ? 1000 * r.jitterBufferDelay / r.jitterBufferEmittedCount : null;
      if (lastBytes) out.kbps = 8 * (r.bytesReceived - lastBytes[0]) / (r.timestamp - lastBytes[1]);
      lastBytes = [r.bytesReceived, r.timestamp];
      const codec = report.get(r.codecId);
      if (codec) out.codec = codec.mimeType;
    }
    if (r.type === 'candidate-pair' && r.nominated && r.state === 'succeeded' && r.currentRoundTripTime !== undefined) {
      out.rttMs = 1000 * r.currentRoundTripTime;
    }
  });
  gaga.stats = out;
  const f = (v, d = 0) => (v === null || v === undefined ? '-' : Number(v).toFixed(d));
  $('stats').textContent = [
    'fps      ' + f(out.fps), 'bitrate  ' + f(out.kbps) + ' kbit/s', 'rtt      ' + f(out.rttMs, 1) + ' ms',
    'jitterbuf ' + f(out.jitterBufferMs, 1) + ' ms', 'decoded  ' + f(out.framesDecoded), 'codec    ' + (out.codec || '-'),
    'size     ' + (out.size || '-'),
  ].join('\n');
}

// Idle screen when no picture came for idleAfterS; a connection stuck while connecting is retried.
setInterval(() => {
  const stale = performance.now() - lastFrameAt > 1000 * config.idleAfterS;
  $('idle').classList.toggle('gone', !stale);
  $('idle-text').textContent = gaga.state === 'connected' ? 'Waiting for the avatar' : 'Connecting';
  if (pc && gaga.state !== 'connected' && performance.now() - connectingSince > 15000) scheduleReconnect('timeout');
  pollStats().catch(() => {});
}, 1000);

function toggleStats() { if (!kiosk) $('stats').classList.toggle('hidden'); }
$('stats-toggle').onclick = toggleStats;
document.addEventListener('keydown', (e) => { if (e.key === 's' || e.key === 'S') toggleStats(); });
$('connect').onclick = () => {
  gaga.wanted = !gaga.wanted;
  $('connect').textContent = gaga.wanted ? 'Disconnect' : 'Connect';
  if (gaga.wanted) connect(); else { teardown(); setStatus('disconnected'); }
};
$('upstream').onchange = () => { gaga.upstream = $('upstream').checked; connect(); };
// Leaving the page closes the connection at once (DTLS close), so the server frees the slot now.
window.addEventListener('pagehide', () => { gaga.wanted = false; teardown(); });
if (kiosk) document.addEventListener('click', () => document.documentElement.requestFullscreen().catch(() => {}));
connect();
