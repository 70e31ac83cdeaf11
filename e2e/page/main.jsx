// A minimal assistant-ui page for the browser check: the README's MyRuntimeProvider, a frontend
// get_weather tool, and a thread built from primitives.
import { ComposerPrimitive, MessagePrimitive, ThreadPrimitive, useAssistantTool } from "@assistant-ui/react";
import { createRoot } from "react-dom/client";
import { MyRuntimeProvider } from "./MyRuntimeProvider.tsx";

const query = new URLSearchParams(window.location.search);

function WeatherTool() {
  useAssistantTool({
    toolName: "get_weather",
    type: "frontend",
    description: "The current weather for a place",
    parameters: { type: "object", properties: { location: { type: "string" } }, required: ["location"] },
    execute: async ({ location }) => {
      window.weatherRuns = (window.weatherRuns ?? 0) + 1;
      return { location, temperature: "21°C", sky: "sunny" };
    },
    render: ({ args, result }) => (
      <div className="tool">
        get_weather({args?.location}) → {result === undefined ? "running…" : JSON.stringify(result)}
      </div>
    ),
  });
  return null;
}

const UserMessage = () => (
  <MessagePrimitive.Root className="user">
    <MessagePrimitive.Parts />
  </MessagePrimitive.Root>
);

const AssistantMessage = () => (
  <MessagePrimitive.Root className="assistant">
    <MessagePrimitive.Parts />
  </MessagePrimitive.Root>
);

function App() {
  return (
    <MyRuntimeProvider
      api={query.get("api")}
      protocol={query.get("protocol") ?? "data-stream"}
      onError={(error) => (window.lastError = [String(error)])}
    >
      <WeatherTool />
      <ThreadPrimitive.Root>
        <ThreadPrimitive.Viewport>
          <ThreadPrimitive.Messages components={{ UserMessage, AssistantMessage }} />
        </ThreadPrimitive.Viewport>
        <ComposerPrimitive.Root>
          <ComposerPrimitive.Input placeholder="Write a message" />
          <ComposerPrimitive.Send>Send</ComposerPrimitive.Send>
          <ComposerPrimitive.Cancel>Stop</ComposerPrimitive.Cancel>
        </ComposerPrimitive.Root>
      </ThreadPrimitive.Root>
    </MyRuntimeProvider>
  );
}

createRoot(document.getElementById("root")).render(<App />);
