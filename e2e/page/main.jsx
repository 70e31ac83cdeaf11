// A minimal assistant-ui page for the browser check: the README's MyRuntimeProvider with its
// get_weather toolkit, and a thread built from primitives, showing what assistant-ui's own Thread
// shows: reasoning, a card for tools the page has no UI for (the backend's), and a failed reply.
import {
  ActionBarPrimitive,
  ComposerPrimitive,
  ErrorPrimitive,
  MessagePrimitive,
  ThreadPrimitive,
} from "@assistant-ui/react";
import { createRoot } from "react-dom/client";
import { MyRuntimeProvider } from "./MyRuntimeProvider.tsx";

const query = new URLSearchParams(window.location.search);

const UserMessage = () => (
  <MessagePrimitive.Root className="user">
    <MessagePrimitive.Parts />
    <ActionBarPrimitive.Root autohide="never">
      <ActionBarPrimitive.Edit className="edit">Edit</ActionBarPrimitive.Edit>
    </ActionBarPrimitive.Root>
  </MessagePrimitive.Root>
);

// An edited message's composer, in its place: saving it sends the message again, as an edit.
const EditComposer = () => (
  <ComposerPrimitive.Root className="editing">
    <ComposerPrimitive.Input />
    <ComposerPrimitive.Send>Save</ComposerPrimitive.Send>
  </ComposerPrimitive.Root>
);

const Reasoning = ({ text }) => (
  <details className="reasoning" open>
    <summary>Reasoning</summary>
    {text}
  </details>
);

const ToolCard = ({ toolName, argsText, result, isError }) => (
  <div className={isError ? "tool-card failed" : "tool-card"}>
    {`${toolName}(${argsText})`}
    {result === undefined ? " …" : ` → ${JSON.stringify(result)}`}
  </div>
);

const AssistantMessage = () => (
  <MessagePrimitive.Root className="assistant">
    <MessagePrimitive.Parts components={{ Reasoning, tools: { Fallback: ToolCard } }} />
    <MessagePrimitive.Error>
      <ErrorPrimitive.Root className="message-error">
        <ErrorPrimitive.Message />
      </ErrorPrimitive.Root>
    </MessagePrimitive.Error>
  </MessagePrimitive.Root>
);

function App() {
  return (
    <MyRuntimeProvider
      api={query.get("api")}
      protocol={query.get("protocol") ?? "data-stream"}
      onError={(error) => (window.lastError = [String(error)])}
    >
      <ThreadPrimitive.Root>
        <ThreadPrimitive.Viewport>
          <ThreadPrimitive.Messages components={{ UserMessage, EditComposer, AssistantMessage }} />
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
