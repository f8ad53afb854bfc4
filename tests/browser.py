"""Headless Chromium driven over the DevTools protocol (aiohttp's websocket client, no extra package)."""

from __future__ import annotations

import asyncio
import itertools
import json
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import aiohttp

FLAGS = [
    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--autoplay-policy=no-user-gesture-required", "--disable-renderer-backgrounding",
    "--disable-background-timer-throttling", "--disable-backgrounding-occluded-windows",
    "--remote-debugging-port=0", "--window-size=640,640",
]
FAKE_CAMERA = ["--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream"]


def fake_media(clip: Path, out_dir: Path, seconds: float = 10.0, width: int = 320, height: int = 304,
               fps: int = 30, start_s: float = 0.0, sound: Path | None = None,
               codes: bool = False) -> list[str]:
    """Chromium flags that make getUserMedia play `clip` (its picture and its sound, or the sound of
    `sound`, looped): writes a y4m (raw 4:2:0 frames, what Chromium's fake camera reads) and a 48 kHz
    mono WAV to out_dir. With `codes`, each frame carries its index as a frame code (top-left), so a
    test can tell which clip frame a received camera image is, however the loaded machine paced it."""
    import av
    import numpy as np

    from gaga_ros.audio import Resampler, from_frame
    from gaga_ros.stream import stamp_code

    y4m, wav = out_dir / f"{clip.stem}.y4m", out_dir / f"{clip.stem}.wav"
    with av.open(str(clip)) as c, open(y4m, "wb") as f:
        f.write(f"YUV4MPEG2 W{width} H{height} F{fps}:1 Ip A1:1 C420jpeg\n".encode())
        rate = float(c.streams.video[0].average_rate)
        n = 0
        for i, frame in enumerate(c.decode(video=0)):
            t = i / rate
            while t >= start_s + n / fps and n < seconds * fps:  # the clip's frames at `fps`
                picture = frame.reformat(width, height, "rgb24")
                if codes:
                    picture = av.VideoFrame.from_ndarray(stamp_code(picture.to_ndarray(), n), "rgb24")
                yuv = picture.reformat(format="yuv420p").to_ndarray()
                f.write(b"FRAME\n" + yuv.tobytes())
                n += 1
    resample, pcm = Resampler(48000, 1), []
    with av.open(str(sound or clip)) as c:
        for frame in c.decode(audio=0):
            pcm.append(resample(from_frame(frame)).samples[:, 0])
    samples = np.concatenate(pcm)[int(start_s * 48000):int((start_s + seconds) * 48000)]
    write_wav(wav, samples)
    return [f"--use-file-for-fake-video-capture={y4m}", f"--use-file-for-fake-audio-capture={wav}"]


def write_wav(path: Path, samples) -> Path:
    """48 kHz mono 16-bit WAV (what Chromium's fake microphone plays) of int16 samples."""
    import wave

    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(48000)
        w.writeframes(samples.astype("<i2").tobytes())
    return path


def tone_bursts(path: Path, seconds: float, freq: float, every: float, length: float,
                amplitude: float) -> Path:
    """A WAV of `freq` Hz bursts `length` s long every `every` s: sound with sharp, known onsets."""
    import numpy as np

    t = np.arange(int(seconds * 48000)) / 48000
    tone = amplitude * np.sin(2 * np.pi * freq * t) * ((t % every) < length)
    return write_wav(path, (tone * 32767).astype(np.int16))


def chromium_path() -> str | None:
    """The Chromium binary on PATH (Debian: apt-get install -y chromium), or None."""
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


class CdpError(RuntimeError):
    """A DevTools command failed or a page script threw."""


class Session:
    """One DevTools websocket (the browser's or a page's) with request/response matching."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future] = {}
        self._reader = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        async for msg in self.ws:
            if msg.type != aiohttp.WSMsgType.TEXT:
                continue
            data = json.loads(msg.data)
            fut = self._waiting.pop(data.get("id"), None)
            if fut is not None and not fut.done():
                fut.set_result(data)
        for fut in self._waiting.values():
            if not fut.done():
                fut.set_exception(CdpError("DevTools connection closed"))

    async def send(self, method: str, timeout: float = 30.0, **params) -> dict:
        """Run one DevTools command and return its result."""
        msg_id = next(self._ids)
        fut = asyncio.get_running_loop().create_future()
        self._waiting[msg_id] = fut
        await self.ws.send_str(json.dumps({"id": msg_id, "method": method, "params": params}))
        data = await asyncio.wait_for(fut, timeout)
        if "error" in data:
            raise CdpError(f"{method}: {data['error']}")
        return data["result"]

    async def close(self) -> None:
        await self.ws.close()
        self._reader.cancel()


class Page:
    """A browser tab."""

    def __init__(self, browser: Browser, target_id: str, session: Session) -> None:
        self.browser, self.target_id, self.session = browser, target_id, session

    async def evaluate(self, expression: str, timeout: float = 30.0):
        """The JSON value of a JS expression (promises are awaited)."""
        result = await self.session.send("Runtime.evaluate", timeout=timeout, expression=expression,
                                         returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise CdpError(f"{expression[:80]!r} threw: {result['exceptionDetails']}")
        return result["result"].get("value")

    async def wait_for(self, expression: str, timeout: float = 20.0, poll: float = 0.2):
        """Poll a JS expression until it is truthy (a throw counts as not yet); return its value."""
        deadline = time.monotonic() + timeout
        guarded = f"(() => {{ try {{ return ({expression}); }} catch (e) {{ return null; }} }})()"
        while True:
            try:
                value = await self.evaluate(guarded)
            except CdpError as e:  # no page context yet (still navigating): not yet
                if "execution context" not in str(e):
                    raise
                value = None
            if value:
                return value
            if time.monotonic() > deadline:
                raise TimeoutError(f"{expression!r} still {value!r} after {timeout} s")
            await asyncio.sleep(poll)

    async def close(self) -> None:
        """Close the tab (its peer connections end with it)."""
        await self.session.close()
        await self.browser.session.send("Target.closeTarget", targetId=self.target_id)


class Browser:
    """A headless Chromium process with a fresh profile; use as `async with Browser() as b:`."""

    def __init__(self, fake_camera: bool = False, extra_flags: list[str] | None = None) -> None:
        self.flags = FLAGS + (FAKE_CAMERA if fake_camera else []) + (extra_flags or [])
        self.proc: subprocess.Popen | None = None
        self.http: aiohttp.ClientSession | None = None
        self.session: Session | None = None
        self.port = 0

    async def __aenter__(self) -> Browser:
        binary = chromium_path()
        if binary is None:
            raise RuntimeError("chromium not found: apt-get install -y chromium")
        self.profile = tempfile.TemporaryDirectory(prefix="gaga-chromium-")
        self.proc = subprocess.Popen([binary, *self.flags, f"--user-data-dir={self.profile.name}",
                                      "about:blank"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        port_file = Path(self.profile.name) / "DevToolsActivePort"
        deadline = time.monotonic() + 30
        while not (port_file.exists() and port_file.read_text().count("\n") >= 1):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"chromium did not open DevTools (exit code {self.proc.poll()})")
            await asyncio.sleep(0.05)
        self.port, path = port_file.read_text().split("\n")[:2]
        self.http = aiohttp.ClientSession()
        ws = await self.http.ws_connect(f"ws://127.0.0.1:{self.port}{path}", max_msg_size=0)
        self.session = Session(ws)
        return self

    async def new_page(self, url: str, window: bool = True) -> Page:
        """Open url in a new window (visible, so it renders) or, window=False, a background tab
        (decodes video but skips painting and requestVideoFrameCallback)."""
        target = (await self.session.send("Target.createTarget", url=url, newWindow=window))["targetId"]
        ws = await self.http.ws_connect(f"ws://127.0.0.1:{self.port}/devtools/page/{target}", max_msg_size=0)
        return Page(self, target, Session(ws))

    def kill(self) -> None:
        """End the browser process abruptly (as a crash would)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    async def __aexit__(self, *exc) -> None:
        if self.session is not None:
            try:
                await asyncio.wait_for(self.session.send("Browser.close"), 5)
            except (TimeoutError, CdpError, ConnectionError):
                pass
            await self.session.close()
        if self.http is not None:
            await self.http.close()
        if self.proc is not None:
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.kill()
        self.profile.cleanup()
