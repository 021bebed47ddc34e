"""What the participant sees and hears: the `feedback:` settings (participant.settings, pydantic
only), the feedback engine and its LSL outlet (participant.feedback), and audio
(participant.audio: tone, chime, guided recordings)."""
