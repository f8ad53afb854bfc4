// gaga_ros pages: one WebRTC connection each (avatar down, voices both ways, the operator's camera
// up and the robot's camera down, an "expression" data channel), automatic reconnect, plain-words
// status, stats overlay, frame-code latency probe. The role comes from the path: / is a viewer,
// /kiosk the robot's face display (its microphone is the robot's), /operator drives the face.
'use strict';

const params = new URLSearchParams(location.search);
const flag = (name) => params.has(name) && params.get(name) !== '0';
const path = location.pathname.replace(/\/+$/, '');
const kiosk = flag('kiosk') || path.endsWith('/kiosk');
const role = path.endsWith('/operator') ? 'operator' : kiosk ? 'kiosk' : 'viewer';
const token = params.get('token');
const authHeaders = token ? { Authorization: 'Bearer ' + token } : {};
const $ = (id) => document.getElementById(id);
const video = $('video');
const voice = $('voice');

// Everything a test, bench or operator script may read (Runtime.evaluate / the console).
const gaga = window.gaga = {
  role, state: 'new', connects: 0, frames: 0, codes: [], stats: {}, errors: [], wanted: true,
  media: null, mediaError: null, busy: null, status: {}, voiceLevels: [], cameraFrames: 0,
  micMuted: false, soundMuted: false, cameraOff: false,
};

let pc = null;
let uplink = null;  // a kiosk's microphone to the bridge, when the avatar comes through the SFU
let channel = null;
let pendingReplies = [];
let config = { iceServers: [], idleAfterS: 3, codec: null };
let retryMs = 500;
let retryTimer = null;
let connectingSince = 0;
let lastFrameAt = 0;
let cameraTransceiver = null;

document.body.classList.add(role);
if (kiosk) document.body.classList.add('kiosk');
if (kiosk || params.get('stats') === '0') $('stats').classList.add('hidden');

function setStatus(text) {
  gaga.state = text;
  $('status').textContent = text;
}

async function fetchJson(path, options = {}) {
  const headers = { ...authHeaders, ...(options.headers || {}) };
  // POSTs send back the CSRF token /config handed out: only pages this server served may change state.
  if (options.method === 'POST') headers['X-CSRF-Token'] = config.csrf;
  const res = await fetch(path, { ...options, headers });
  if (!res.ok) {
    const err = new Error(path + ': HTTP ' + res.status + ' ' + (await res.text()));
    err.status = res.status;
    throw err;
  }
  return res.json();
}

// Camera and microphone, asked once and kept across reconnects. The browser's echo cancellation,
// noise suppression and gain control stay on: the kiosk plays the operator's voice next to its own
// microphone. A page denied one or both goes on with what it got and says so.
async function getMedia() {
  if (gaga.media || !navigator.mediaDevices) return gaga.media;
  const audio = { echoCancellation: true, noiseSuppression: true, autoGainControl: true };
  const video = role === 'operator' ? { width: 640, height: 480 } : false;
  const tries = video ? [{ audio, video }, { audio }, { video }] : [{ audio }];
  const denied = [];
  for (const constraints of tries) {
    try {
      gaga.media = await navigator.mediaDevices.getUserMedia(constraints);
      break;
    } catch (err) {
      denied.push(err.name + ': ' + err.message);
    }
  }
  const has = (kind) => !!(gaga.media && gaga.media.getTracks().some((t) => t.kind === kind));
  const missing = [video && !has('video') ? 'camera' : null, has('audio') ? null : 'microphone'].filter(Boolean);
  if (missing.length) {
    const refused = denied.some((d) => d.startsWith('NotAllowedError'));
    gaga.mediaError = 'No ' + missing.join(' and ') + ' (' + (denied[0] || 'none found') + '). ' +
      (role === 'operator'
        ? (missing.includes('camera') ? 'The robot\'s face goes on with its idle motion' +
           (has('audio') ? ' and your voice moves its mouth' : '') + '. ' : '')
        : 'The operator will not hear the robot\'s room. ') +
      (refused ? 'Allow them in the browser\'s site settings and reload.' : 'Connect one and reload.');
  }
  if (role === 'operator' && has('video')) {
    $('self-view').srcObject = gaga.media;
    // No faster than the robot takes (the bridge's operator_fps): faster frames it would only drop.
    await gaga.media.getVideoTracks()[0].applyConstraints({ ...video, frameRate: { max: config.operatorFps || 30 } })
      .catch((err) => gaga.errors.push('camera frame rate: ' + err));
  }
  applyMutes();
  return gaga.media;
}

function applyMutes() {
  const media = gaga.media;
  if (media) {
    media.getAudioTracks().forEach((t) => { t.enabled = !gaga.micMuted; });
    media.getVideoTracks().forEach((t) => { t.enabled = !gaga.cameraOff; });
  }
  voice.muted = gaga.soundMuted;
  $('mute-mic').textContent = gaga.micMuted ? 'Unmute microphone' : 'Mute microphone';
  $('mute-sound').textContent = gaga.soundMuted ? 'Unmute sound' : 'Mute sound';
  $('camera').textContent = gaga.cameraOff ? 'Camera on' : 'Camera off';
  for (const [id, on] of [['mute-mic', gaga.micMuted], ['kiosk-mute-mic', gaga.micMuted],
    ['mute-sound', gaga.soundMuted], ['kiosk-mute-sound', gaga.soundMuted], ['camera', gaga.cameraOff]]) {
    $(id).classList.toggle('on', on);
  }
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
    gaga.viaSfu = !!config.sfu && role !== 'operator' && !flag('direct');
    if (gaga.viaSfu) { await subscribe(); return; }
    const media = role === 'viewer' ? null : await getMedia();
    const peer = pc = new RTCPeerConnection({ iceServers: config.iceServers });
    // The server adds its transceivers in this order (gaga_ros/stream/webrtc.py, _negotiate).
    peer.addTransceiver('video', { direction: 'recvonly' });
    const streams = media ? [media] : [];
    if (role === 'operator') {
      const cam = media && media.getVideoTracks()[0];
      cameraTransceiver = peer.addTransceiver(cam || 'video', { direction: cam ? 'sendrecv' : 'recvonly', streams });
    }
    const mic = media && media.getAudioTracks()[0];
    peer.addTransceiver(mic || 'audio', { direction: mic ? 'sendrecv' : 'recvonly', streams });
    channel = peer.createDataChannel('expression');
    channel.onmessage = (e) => { const r = pendingReplies.shift(); if (r) r(JSON.parse(e.data)); };
    channel.onclose = () => { if (peer === pc) scheduleReconnect('data channel closed'); };
    peer.ontrack = onTrack;
    peer.onconnectionstatechange = () => onConnectionState(peer);
    await peer.setLocalDescription(await peer.createOffer());
    await waitIceGathering(peer, 2000);
    const body = { sdp: peer.localDescription.sdp, type: peer.localDescription.type, role };
    if (params.get('codec')) body.codec = params.get('codec');
    const answer = await fetchJson('/offer', {
      method: 'POST', headers: { 'Content-Type': 'application/json' }, body: JSON.stringify(body),
    });
    gaga.clientId = answer.id;
    gaga.busy = null;
    if (peer === pc) await peer.setRemoteDescription(answer);
  } catch (err) {
    gaga.errors.push(String(err));
    if (err.status === 409) {  // another operator: wait for them to leave, calmly
      gaga.busy = 'Another operator is connected; one at a time. This page takes over when they leave.';
      retryMs = 3000;
    }
    scheduleReconnect(String(err.message || err));
  }
}

// Through the SFU (the bridge's sfu setting): the server offers. The bridge asks Janus for a
// subscriber and hands over Janus's offer; the page answers through the bridge, so it never talks
// to Janus's API and the bridge's token rules hold. Video and the operator's voice come this way;
// expressions go by POST /expression (no data channel on a Janus subscription). A kiosk's
// microphone goes straight to the bridge on a second, audio-only connection.
async function subscribe() {
  const offer = await fetchJson('/subscribe', {
    method: 'POST', headers: { 'Content-Type': 'application/json' }, body: JSON.stringify({ role }),
  });
  const peer = pc = new RTCPeerConnection({ iceServers: config.iceServers });
  peer.ontrack = onTrack;
  peer.onconnectionstatechange = () => onConnectionState(peer);
  await peer.setRemoteDescription({ type: offer.type, sdp: offer.sdp });
  await peer.setLocalDescription(await peer.createAnswer());
  await waitIceGathering(peer, 2000);
  gaga.clientId = offer.id;
  gaga.sfuEpoch = offer.epoch;
  if (peer !== pc) return;
  await fetchJson('/answer', {
    method: 'POST', headers: { 'Content-Type': 'application/json' },
    body: JSON.stringify({ id: offer.id, type: 'answer', sdp: peer.localDescription.sdp }),
  });
  if (role === 'kiosk') await sendMicrophone();
}

async function sendMicrophone() {
  const media = await getMedia();
  const mic = media && media.getAudioTracks()[0];
  if (!mic) return;
  const peer = uplink = new RTCPeerConnection({ iceServers: config.iceServers });
  peer.addTransceiver(mic, { direction: 'sendonly', streams: [media] });
  peer.onconnectionstatechange = () => {
    const st = peer.connectionState;
    if (peer === uplink && (st === 'failed' || st === 'closed')) scheduleReconnect('microphone connection ' + st);
  };
  await peer.setLocalDescription(await peer.createOffer());
  await waitIceGathering(peer, 2000);
  const answer = await fetchJson('/offer', {
    method: 'POST', headers: { 'Content-Type': 'application/json' },
    body: JSON.stringify({ sdp: peer.localDescription.sdp, type: peer.localDescription.type, role }),
  });
  if (peer === uplink) await peer.setRemoteDescription(answer);
}

function onTrack(e) {
  if (e.track.kind === 'audio') {
    voice.srcObject = new MediaStream([e.track]);
    listen(voice.srcObject);
    voice.play().then(() => { gaga.audioBlocked = false; }).catch(() => { gaga.audioBlocked = true; });
    return;
  }
  if ('jitterBufferTarget' in e.receiver) e.receiver.jitterBufferTarget = 0;
  if ('playoutDelayHint' in e.receiver) e.receiver.playoutDelayHint = 0;
  const target = cameraTransceiver && e.transceiver === cameraTransceiver ? $('robot-camera') : video;
  target.srcObject = new MediaStream([e.track]);
  target.play().catch(() => {});
}

function onConnectionState(peer) {
  if (peer !== pc) return;
  const st = peer.connectionState;
  if (st === 'connected') { setStatus('connected'); retryMs = 500; gaga.connects += 1; }
  else if (st === 'failed' || st === 'closed' || (st === 'disconnected' && gaga.viaSfu)) {
    scheduleReconnect('connection ' + st);
  } else setStatus(st);
}

function teardown() {
  // The camera and microphone stay open for the next connection (asked once).
  if (pc) { const old = pc; pc = null; old.close(); }
  if (uplink) { const old = uplink; uplink = null; old.close(); }
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

// Loudness of the voice this page hears (WebAudio analyser on the received stream), about ten
// times a second as [wall-clock ms, RMS dBFS]: for the page's own meter, tests and benches.
let audioCtx = null;
function listen(stream) {
  try {
    audioCtx = audioCtx || new AudioContext();
    const analyser = audioCtx.createAnalyser();
    analyser.fftSize = 2048;
    audioCtx.createMediaStreamSource(stream).connect(analyser);
    const buf = new Float32Array(analyser.fftSize);
    clearInterval(listen.timer);
    listen.timer = setInterval(() => {
      if (audioCtx.state === 'suspended') audioCtx.resume().catch(() => {});
      analyser.getFloatTimeDomainData(buf);
      let sum = 0;
      for (const v of buf) sum += v * v;
      const db = 10 * Math.log10(Math.max(sum / buf.length, 1e-12));
      gaga.voiceLevels.push([performance.timeOrigin + performance.now(), db]);
      if (gaga.voiceLevels.length > 3000) gaga.voiceLevels.splice(0, 1000);
    }, 100);
  } catch (err) {
    gaga.errors.push('audio meter: ' + err);
  }
}

// The current avatar picture as a PNG data URL (tests measure the mouth on what the page shows).
gaga.grab = () => {
  const c = document.createElement('canvas');
  c.width = video.videoWidth;
  c.height = video.videoHeight;
  if (!c.width) return null;
  c.getContext('2d').drawImage(video, 0, 0);
  return c.toDataURL('image/png');
};

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
  // From this page's first connect to its first picture (signalling, ICE, DTLS, a keyframe, decode).
  if (gaga.firstFrameMs === undefined) gaga.firstFrameMs = lastFrameAt - connectingSince;
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
  if (gaga.viaSfu) {
    fetchJson('/expression', {
      method: 'POST', headers: { 'Content-Type': 'application/json' },
      body: typeof obj === 'string' ? obj : JSON.stringify(obj),
    }).then(resolve, (err) => resolve({ ok: false, error: String(err.message || err) }));
    return;
  }
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

// What the page waits for, in plain words: from the connection, the camera and microphone, and the
// server's GET /status (the avatar's frames, the operator, what the ROS side reported).
function explain(stale) {
  const st = gaga.status || {};
  // What tracking says matters only while an operator is there to be tracked.
  const notes = Object.entries(st.notes || {}).filter(([k]) => k !== 'tracking' || st.operator);
  const lines = [];
  let headline = null;
  if (gaga.busy) headline = gaga.busy;
  else if (gaga.state !== 'connected') headline = gaga.state.startsWith('reconnecting') ? 'Reconnecting to the robot' : 'Connecting to the robot';
  else if (st.avatar === 'none') headline = 'No avatar yet: the robot is still building its face';
  else if (stale) headline = 'No new frames: the avatar has no expressions to show';
  if (headline && gaga.state === 'connected' && st.avatar !== 'none' && stale && !notes.length) {
    lines.push('Nothing drives the face: no driver, tracker or operator is sending expressions.');
  }
  lines.push(...notes.map(([, text]) => text));
  if (role !== 'operator' && st.operator === false && gaga.state === 'connected') lines.push('Operator not connected.');
  if (role === 'operator' && gaga.state === 'connected' && $('robot-camera').classList.contains('hidden')) {
    lines.push('The robot has no camera to show (start it with robot_camera:=<image topic>): this is your camera.');
  }
  if (gaga.mediaError) lines.push(gaga.mediaError);
  if (gaga.audioBlocked) lines.push('Click the page to hear the voice (the browser blocked autoplay).');
  return { headline, lines };
}

async function pollStatus() {
  if (gaga.state !== 'connected') return;
  try { gaga.status = await fetchJson('/status'); } catch (err) { gaga.status = {}; }
  // The bridge published anew (Janus restarted): this subscription belongs to the old one.
  const sfu = gaga.status.sfu;
  if (gaga.viaSfu && sfu && sfu.epoch !== gaga.sfuEpoch) scheduleReconnect('the relay restarted');
}

// Idle screen when no picture came for idleAfterS; a connection stuck while connecting is retried.
setInterval(() => {
  const stale = performance.now() - lastFrameAt > 1000 * config.idleAfterS;
  const { headline, lines } = explain(stale);
  gaga.explained = [headline, ...lines].filter(Boolean);
  // The operator's page keeps its views and says it in a banner; the others show the idle screen.
  $('idle').classList.toggle('gone', role === 'operator' || (!stale && !gaga.busy));
  $('idle-text').textContent = headline || 'Waiting for the avatar';
  $('idle-detail').textContent = lines.join(' ');
  const banner = role === 'operator' ? [headline, ...lines].filter(Boolean).join(' ') : (stale ? '' : lines.join(' '));
  $('notice').textContent = banner;
  $('notice').classList.toggle('hidden', !banner || kiosk);
  const cam = $('robot-camera');
  cam.classList.toggle('hidden', !(cam.srcObject && cam.videoWidth));
  // Without the robot's camera the operator sees themself (as the tracker does), mirrored.
  $('self-view').classList.toggle('hidden', !cam.classList.contains('hidden') || !$('self-view').srcObject);
  if (pc && gaga.state !== 'connected' && performance.now() - connectingSince > 15000) scheduleReconnect('timeout');
  pollStats().catch(() => {});
  pollStatus().catch(() => {});
}, 1000);
$('robot-camera').requestVideoFrameCallback(function counted() {
  gaga.cameraFrames += 1;
  $('robot-camera').requestVideoFrameCallback(counted);
});

function toggleStats() { if (!kiosk) $('stats').classList.toggle('hidden'); }
$('stats-toggle').onclick = toggleStats;
document.addEventListener('keydown', (e) => { if (e.key === 's' || e.key === 'S') toggleStats(); });
$('connect').onclick = () => {
  gaga.wanted = !gaga.wanted;
  $('connect').textContent = gaga.wanted ? 'Disconnect' : 'Connect';
  if (gaga.wanted) connect(); else { teardown(); setStatus('disconnected'); }
};
const toggle = (key) => () => { gaga[key] = !gaga[key]; applyMutes(); };
$('mute-mic').onclick = $('kiosk-mute-mic').onclick = toggle('micMuted');
$('mute-sound').onclick = $('kiosk-mute-sound').onclick = toggle('soundMuted');
$('camera').onclick = toggle('cameraOff');
// For tests and scripts: the same as the buttons.
gaga.setCamera = (on) => { gaga.cameraOff = !on; applyMutes(); };
gaga.setMic = (on) => { gaga.micMuted = !on; applyMutes(); };
document.addEventListener('click', () => { if (voice.srcObject) voice.play().then(() => { gaga.audioBlocked = false; }).catch(() => {}); });
// Leaving the page closes the connection at once (DTLS close), so the server frees the slot now.
window.addEventListener('pagehide', () => { gaga.wanted = false; teardown(); });
if (kiosk) document.addEventListener('click', () => document.documentElement.requestFullscreen().catch(() => {}));
connect();
