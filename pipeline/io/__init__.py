"""Where windows come from and results go: the wire format, MQTT, RabbitMQ, the messages published."""
