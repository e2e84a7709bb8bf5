"""The generation service: turns a prompt (text, or an image with optional text) into an answer
from the upstream model, behind a quota reservation, an in-flight limit, a circuit breaker and
a response cache."""
