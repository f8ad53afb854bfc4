"""Base of the lifecycle (managed) nodes: models load on configure, the device is taken on
activate and released on cleanup; `autostart` brings a node up active without an orchestrator.

A transition that the current state does not allow (activate while active, a second deactivate) is
refused with a failure reply and the node keeps its state: the pinned rclpy raises RCLError out of
its change_state service instead, which stopped the node.
"""

from __future__ import annotations

from lifecycle_msgs.srv import ChangeState
from rclpy.lifecycle import Node as LifecycleNode
from rclpy.lifecycle import State, TransitionCallbackReturn

from gaga_ros.nodes.guard import Guarded
from gaga_ros.nodes.parameters import Param, declare

AUTOSTART = Param("autostart", True, "Configure and activate at start (false: wait for an "
                  "orchestrator to drive the lifecycle transitions).")


class ManagedNode(Guarded, LifecycleNode):
    """Subclasses implement configure()/activate()/deactivate()/cleanup(); errors fail the transition."""

    def __init__(self, name: str, params: tuple[Param, ...]) -> None:
        super().__init__(name)
        self.p = declare(self, (AUTOSTART, *params))
        self.active = False
        service = self._service_change_state
        service.callback = self.guard.wrap("lifecycle change_state", self._allowed_only(service.callback))

    def _allowed_only(self, change_state):
        """The change_state handler, refusing transitions the current state has not got."""
        def handle(request: ChangeState.Request, response: ChangeState.Response) -> ChangeState.Response:
            transition = request.transition
            available = self._state_machine.available_transitions  # (id, label, start, ..., goal, ...)
            if not any((t[1] == transition.label) if transition.label else (t[0] == transition.id)
                       for t in available):
                state = self._state_machine.current_state[1]
                allowed = ", ".join(t[1] for t in available) or "none"
                self.guard.refuse("lifecycle change_state", f"transition {transition.label or transition.id} "
                                  f"is not allowed while {state}: allowed are {allowed}")
                response.success = False
                return response
            return change_state(request, response)

        return handle

    def start(self) -> None:
        """Honour `autostart`; call at the end of the subclass constructor."""
        if self.p["autostart"]:
            self.trigger_configure()
            self.trigger_activate()

    def configure(self) -> None: ...

    def activate(self) -> None: ...

    def deactivate(self) -> None: ...

    def cleanup(self) -> None: ...

    def close(self) -> None:
        """Process exit: stop workers and release the device whatever the lifecycle state."""
        if self.active:
            self.active = False
            self.deactivate()
        self.cleanup()

    def _run(self, step, what: str) -> TransitionCallbackReturn:
        try:
            step()
        except Exception as exc:  # the transition fails with the reason; the node stays up
            self.get_logger().error(f"{what} failed: {exc}")
            return TransitionCallbackReturn.FAILURE
        return TransitionCallbackReturn.SUCCESS

    def on_configure(self, state: State) -> TransitionCallbackReturn:
        return self._run(self.configure, "configure")

    def on_activate(self, state: State) -> TransitionCallbackReturn:
        self.active = True  # activate() may already publish
        result = self._run(self.activate, "activate")
        self.active = result == TransitionCallbackReturn.SUCCESS
        return result

    def on_deactivate(self, state: State) -> TransitionCallbackReturn:
        self.active = False
        return self._run(self.deactivate, "deactivate")

    def on_cleanup(self, state: State) -> TransitionCallbackReturn:
        return self._run(self.cleanup, "cleanup")

    def on_shutdown(self, state: State) -> TransitionCallbackReturn:
        self.active = False
        return self._run(self.cleanup, "shutdown")
