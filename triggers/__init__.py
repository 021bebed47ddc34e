"""Decides and fires: TriggerPolicy (when would we like a pulse), SafetyInterlock (may one happen
at all), outputs (serial TTL, LSL marker, simulated stimulator, bus), the append-only audit log,
and TriggerUnit, the facade the pipeline calls once per chunk. See DESIGN.md, "Safety model".

Import from the submodules (triggers.settings, triggers.unit, ...); this file imports nothing so
that loading the settings never pulls in pylsl or pyserial.
"""
